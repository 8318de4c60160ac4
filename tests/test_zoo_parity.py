"""Zoo parity: official architectures built by the reference libraries load into ours and embed identically.

Reference side: timm with the kwargs each hub ``config.json`` publishes (``model_args``,
plus what the model card passes), or transformers ``ViTModel`` / ``Dinov2Model`` /
``Dinov2WithRegistersModel`` saved with ``save_pretrained``. Weights are random, depth
is reduced (1 block for timm files, 2 for transformers folders) so the test is fast; the embedding is computed the way each model
card does. Ours loads the file or folder through ``create_model(checkpoint_path=...)``.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)

import histofm
from histofm.zoo._hf import convert_hf_vit


@pytest.fixture(autouse=True)
def _one_thread():
    # Small CPU work; one thread avoids oversubscription when the machine is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

_SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
_VIRCHOW = dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, **_SWIGLU)
_H_OPTIMUS = dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=False)

# name -> (timm architecture, published kwargs, file name on the hub, embedding recipe of the model card)
TIMM_REFERENCE = {
    "virchow": ("vit_huge_patch14_224", _VIRCHOW, "pytorch_model.bin", "cls_mean1"),
    "virchow2": ("vit_huge_patch14_224", {**_VIRCHOW, "reg_tokens": 4}, "pytorch_model.bin", "cls_mean5"),
    "uni": ("vit_large_patch16_224", dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=True), "pytorch_model.bin", "model"),
    "uni2_h": (
        "vit_giant_patch14_224",
        dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
             num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **_SWIGLU),
        "pytorch_model.bin", "model",
    ),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", _H_OPTIMUS, "pytorch_model.bin", "model"),
    "prov_gigapath": (
        "vit_giant_patch14_dinov2",
        dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
             mlp_ratio=5.33334, num_classes=0),
        "pytorch_model.bin", "model",
    ),
    "kaiko_vits16": ("vit_small_patch16_224", dict(num_classes=0, dynamic_img_size=True), "model.safetensors", "model"),
    "kaiko_vits8": ("vit_small_patch8_224", dict(num_classes=0, dynamic_img_size=True), "model.safetensors", "model"),
    "kaiko_vitb16": ("vit_base_patch16_224", dict(num_classes=0, dynamic_img_size=True), "model.safetensors", "model"),
    "kaiko_vitb8": ("vit_base_patch8_224", dict(num_classes=0, dynamic_img_size=True), "model.safetensors", "model"),
    "lunit_vits16": ("vit_small_patch16_224", dict(num_classes=0), "model.safetensors", "model"),
    "lunit_vits8": ("vit_small_patch8_224", dict(num_classes=0), "model.safetensors", "model"),
}

# Parameter counts as listed in MODELS.md (from the hub checkpoints).
MODELS_MD_PARAMS = {
    "virchow": 631_229_184,
    "virchow2": 631_239_424,
    "uni": 303_350_784,
    "uni2_h": 681_394_176,
    "phikon": 85_798_656,
    "phikon_v2": 303_351_808,
    "h_optimus_0": 1_134_774_272,
    "h_optimus_1": 1_134_774_272,
    "prov_gigapath": 1_134_953_984,
}


_POOL = torch.randn(999_983, generator=torch.Generator().manual_seed(1)) * 0.05  # prime length: no row alignment


def _randomise(model: nn.Module) -> None:
    """Non-trivial values everywhere (LayerNorm gains and LayerScale near 1, tokens random).

    Values are cut from one random pool at shifting offsets: as good as fresh noise for
    a parity test and much cheaper than drawing a billion-parameter model's worth.
    """
    offset = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            near_one = name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight",
                                      "layernorm_before.weight", "layernorm_after.weight", "gamma", "lambda1"))
            n, start = p.numel(), offset % _POOL.numel()
            pool = _POOL if start + n <= _POOL.numel() else _POOL.repeat((start + n) // _POOL.numel() + 1)
            p.copy_(pool[start : start + n].reshape(p.shape) + (1.0 if near_one else 0.0))
            offset += 7 * n + 13


def _card_embedding(ref: nn.Module, x: torch.Tensor, recipe: str) -> torch.Tensor:
    if recipe == "model":
        return ref(x)
    tokens = ref.forward_features(x)  # (B, prefix + N, D)
    start = int(recipe.removeprefix("cls_mean"))  # first patch token: 1 (Virchow) or 5 (Virchow2)
    return torch.cat([tokens[:, 0], tokens[:, start:].mean(1)], dim=-1)


def _images(n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(TIMM_REFERENCE))
def test_timm_checkpoint_parity(name: str, tmp_path) -> None:
    arch, kwargs, filename, recipe = TIMM_REFERENCE[name]
    with torch.device("meta"):  # skip timm's (slow) init: every value is overwritten below
        ref = timm.create_model(arch, pretrained=False, **{**kwargs, "depth": 1})
    ref = ref.to_empty(device="cpu").eval()
    _randomise(ref)
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file(ref.state_dict(), path)
    else:
        torch.save(ref.state_dict(), path)
    ours = histofm.create_model(name, depth=1, checkpoint_path=path)
    x = _images()
    with torch.no_grad():
        expected = _card_embedding(ref, x, recipe)
        got = ours(x)
    assert got.shape == (1, histofm.model_info(name).embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_h_optimus_1_shares_h_optimus_0_architecture() -> None:
    """H-optimus-1 is published with H-optimus-0's timm config, so the parity above covers both."""
    a, b = histofm.model_info("h_optimus_0"), histofm.model_info("h_optimus_1")
    assert a.arch_kwargs == b.arch_kwargs and (a.mean, a.std, a.embedding) == (b.mean, b.std, b.embedding)
    with torch.device("meta"):
        m0, m1 = histofm.create_model("h_optimus_0"), histofm.create_model("h_optimus_1")
    assert {k: v.shape for k, v in m0.state_dict().items()} == {k: v.shape for k, v in m1.state_dict().items()}


FULL_DEPTH = {**TIMM_REFERENCE, "h_optimus_1": TIMM_REFERENCE["h_optimus_0"]}


@pytest.mark.parametrize("name", list(FULL_DEPTH))
def test_full_depth_names_shapes_and_counts_match_timm(name: str) -> None:
    arch, kwargs, _, _ = FULL_DEPTH[name]
    with torch.device("meta"):
        ref = timm.create_model(arch, pretrained=False, **kwargs)
        ours = histofm.create_model(name)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert count == histofm.model_info(name).num_params
    if name in MODELS_MD_PARAMS:
        assert count == MODELS_MD_PARAMS[name]


# ----------------------------------------------------------------- transformers (HF) formats
def _hf_configs(depth: int) -> dict:
    return {
        # Phikon: ViTModel with the early revisions' LayerNorm eps 1e-12 (read back from config.json).
        "phikon": (ViTModel, ViTConfig(hidden_size=768, num_hidden_layers=depth, num_attention_heads=12, intermediate_size=3072,
                                       image_size=224, patch_size=16, layer_norm_eps=1e-12, qkv_bias=True)),
        "phikon_v2": (Dinov2Model, Dinov2Config(hidden_size=1024, num_hidden_layers=depth, num_attention_heads=16, mlp_ratio=4,
                                                image_size=224, patch_size=16, layerscale_value=1e-5, layer_norm_eps=1e-6)),
        # Hibou-B: the values of histai/hibou-b's config.json.
        "hibou_b": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig(
            hidden_size=768, num_hidden_layers=depth, num_attention_heads=12, mlp_ratio=4, image_size=224, patch_size=14,
            num_register_tokens=4, use_swiglu_ffn=True, layerscale_value=1.0, layer_norm_eps=1e-6)),
    }


@pytest.mark.parametrize("name", ["phikon", "phikon_v2", "hibou_b"])
def test_hf_snapshot_parity(name: str, tmp_path) -> None:
    cls, cfg = _hf_configs(depth=2)[name]
    with torch.device("meta"):  # skip the reference's init: every value is overwritten below
        ref = cls(cfg)
    ref = ref.to_empty(device="cpu").eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path / name)
    ours = histofm.create_model(name, depth=2, checkpoint_path=tmp_path / name)
    assert ours.norm.eps == json.loads((tmp_path / name / "config.json").read_text())["layer_norm_eps"]
    x = _images()
    with torch.no_grad():
        out = ref(pixel_values=x)
        tokens = ours.forward_features(x)  # (1, prefix + N, D); registers of Hibou sit at 1..4 in both
        got = ours.forward_head(tokens)  # what ours(x) returns
    torch.testing.assert_close(got, out.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-5, rtol=1e-5)
    if name == "hibou_b":  # the model card's embedding is the pooler output
        torch.testing.assert_close(got, out.pooler_output, atol=1e-5, rtol=1e-5)


def _hub_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the names ``save_pretrained`` writes (transformers 5 renames modules in memory)."""
    sd = dict(model.state_dict())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x keeps the hub names in memory
        return sd
    return dict(revert_weight_conversion(model, sd))


@pytest.mark.parametrize("name", ["phikon", "phikon_v2", "hibou_b"])
def test_hf_full_depth_names_shapes_and_counts(name: str) -> None:
    full_depth = {"phikon": 12, "phikon_v2": 24, "hibou_b": 12}[name]
    cls, cfg = _hf_configs(depth=full_depth)[name]
    with torch.device("meta"):
        ref = cls(cfg)
        ours = histofm.create_model(name)
    converted = convert_hf_vit(_hub_names(ref), ours)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf_count = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("pooler."))
    count = sum(p.numel() for p in ours.parameters())
    # With registers the class token's position row is folded into cls_token: one D-vector fewer.
    folded = ours.embed_dim if name == "hibou_b" else 0
    assert count + folded == hf_count
    assert count == histofm.model_info(name).num_params
    if name in MODELS_MD_PARAMS:
        assert count == MODELS_MD_PARAMS[name]
