"""ViT: parity with timm (same weights, same outputs), registry and loader behaviour."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn

import histofm
from histofm import HistofmError
from histofm.models.vit import VisionTransformer

# (timm kwargs, our kwargs) with depth reduced so the test is fast.
CONFIGS = {
    "plain": (dict(patch_size=16, embed_dim=192, depth=2, num_heads=3), dict(patch_size=16, embed_dim=192, depth=2, num_heads=3)),
    "registers": (
        dict(patch_size=14, embed_dim=192, depth=2, num_heads=3, reg_tokens=4, no_embed_class=True, init_values=1e-5),
        dict(patch_size=14, embed_dim=192, depth=2, num_heads=3, reg_tokens=4, no_embed_class=True, init_values=1e-5),
    ),
    "registers_embed_class": (
        dict(patch_size=14, embed_dim=192, depth=2, num_heads=3, reg_tokens=4),
        dict(patch_size=14, embed_dim=192, depth=2, num_heads=3, reg_tokens=4),
    ),
    "layerscale": (
        dict(patch_size=16, embed_dim=192, depth=2, num_heads=3, init_values=0.5),
        dict(patch_size=16, embed_dim=192, depth=2, num_heads=3, init_values=0.5),
    ),
    "swiglu": (
        dict(patch_size=14, embed_dim=192, depth=2, num_heads=3, mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, init_values=1e-5),
        dict(patch_size=14, embed_dim=192, depth=2, num_heads=3, mlp_ratio=2.66667 * 2, mlp_layer="swiglu", init_values=1e-5),
    ),
    "no_embed_class": (
        dict(patch_size=16, embed_dim=192, depth=2, num_heads=3, no_embed_class=True),
        dict(patch_size=16, embed_dim=192, depth=2, num_heads=3, no_embed_class=True),
    ),
    "patch8": (dict(patch_size=8, embed_dim=192, depth=2, num_heads=3), dict(patch_size=8, embed_dim=192, depth=2, num_heads=3)),
    "no_qkv_bias_no_cls": (
        dict(patch_size=16, embed_dim=192, depth=2, num_heads=3, qkv_bias=False, class_token=False, global_pool="avg", fc_norm=False),
        dict(patch_size=16, embed_dim=192, depth=2, num_heads=3, qkv_bias=False, class_token=False, global_pool="avg"),
    ),
}


def _randomise(model: nn.Module) -> None:
    # Random non-trivial values everywhere (LayerNorm, LayerScale, tokens) so nothing
    # is accidentally compared at its initial constant.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # LayerNorm gains near 1
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.05)


def _pair(name: str):
    timm_kw, our_kw = CONFIGS[name]
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, **{"global_pool": "token", **timm_kw})
    _randomise(ref)
    ours = VisionTransformer(**our_kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", [224, 168])
def test_forward_features_matches_timm(name: str, size: int) -> None:
    ref, ours = _pair(name)
    p = ours.patch_size
    side = (size // p) * p
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        a, b = ref.forward_features(x), ours.forward_features(x)
        pa, pb = ref.forward_head(a, pre_logits=True), ours(x)
    assert a.shape == b.shape == (2, ours.num_prefix_tokens + (side // p) ** 2, ours.embed_dim)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-5)


def test_non_square_input_matches_timm() -> None:
    ref, ours = _pair("registers")
    x = torch.randn(1, 3, 14 * 10, 14 * 13)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


TIMM_FULL = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("vit_small_patch8_224", {}),
    ("vit_base_patch16_224", {}),
    ("vit_large_patch16_224", {}),
    ("vit_base_patch14_dinov2", {}),
    ("vit_large_patch14_dinov2", {}),
    ("vit_large_patch14_reg4_dinov2", {}),
    ("vit_huge_patch14_224", {}),
    ("vit_giant_patch14_reg4_dinov2", {}),
]


@pytest.mark.parametrize("name,kw", TIMM_FULL)
def test_full_size_names_and_shapes_match_timm(name: str, kw: dict) -> None:
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, num_classes=0)
        ours = histofm.create_model(name, **kw)
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b


def test_pooling_modes() -> None:
    m = VisionTransformer(patch_size=16, embed_dim=64, depth=1, num_heads=2, reg_tokens=2, global_pool="token_avg").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = m.forward_features(x)
        emb = m(x)
    assert emb.shape == (2, 128)
    torch.testing.assert_close(emb[:, :64], tokens[:, 0])
    torch.testing.assert_close(emb[:, 64:], tokens[:, 3:].mean(1))  # registers (1, 2) excluded
    m.global_pool = "avg"
    with torch.no_grad():
        torch.testing.assert_close(m(x), tokens[:, 3:].mean(1))


def test_mask_token_replaces_patches() -> None:
    m = VisionTransformer(patch_size=16, embed_dim=64, depth=1, num_heads=2, use_mask_token=True).eval()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        t0 = m.prepare_tokens(x)
        t1 = m.prepare_tokens(x, masks)
        ones = m.prepare_tokens(torch.zeros_like(x), masks)
    torch.testing.assert_close(t0[1], t1[1])  # unmasked sample unchanged
    assert not torch.allclose(t0[0, 1:6], t1[0, 1:6])
    torch.testing.assert_close(t1[0, 1:6], ones[0, 1:6])  # masked tokens ignore the pixels


def test_drop_path_is_active_only_in_training() -> None:
    m = VisionTransformer(patch_size=16, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    m.train()
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))


def test_every_parameter_gets_a_gradient() -> None:
    m = VisionTransformer(patch_size=8, embed_dim=64, depth=2, num_heads=2, reg_tokens=1, init_values=0.1, mlp_layer="swiglu")
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_create_model_unknown_name_suggests() -> None:
    with pytest.raises(HistofmError, match="vit_small_patch16_224"):
        histofm.create_model("vit_smal_patch16_224")


def test_create_model_bad_override() -> None:
    with pytest.raises(HistofmError, match="does not accept"):
        histofm.create_model("vit_tiny_patch16_224", not_an_arg=3)


def test_checkpoint_round_trip_safetensors_and_bin(tmp_path) -> None:
    m = histofm.create_model("vit_tiny_patch16_224", depth=2).eval()
    save_file(m.state_dict(), tmp_path / "w.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "w.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = m(x)
        for f in ("w.safetensors", "w.pth"):
            loaded = histofm.create_model("vit_tiny_patch16_224", depth=2, checkpoint_path=tmp_path / f)
            assert loaded.pos_embed.device.type == "cpu"
            torch.testing.assert_close(loaded(x), ref)


def test_checkpoint_mismatch_lists_keys(tmp_path) -> None:
    m = histofm.create_model("vit_small_patch16_224", depth=2)
    save_file(m.state_dict(), tmp_path / "small.safetensors")
    with pytest.raises(HistofmError, match=r"does not fit this model.*shape mismatches"):
        histofm.create_model("vit_tiny_patch16_224", depth=2, checkpoint_path=tmp_path / "small.safetensors")
    with pytest.raises(HistofmError, match=r"missing .*blocks\.2"):
        histofm.create_model("vit_small_patch16_224", depth=3, checkpoint_path=tmp_path / "small.safetensors")


def test_truncated_and_missing_checkpoint(tmp_path) -> None:
    m = histofm.create_model("vit_tiny_patch16_224", depth=1)
    save_file(m.state_dict(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HistofmError, match="unreadable or truncated"):
        histofm.create_model("vit_tiny_patch16_224", depth=1, checkpoint_path=tmp_path / "t.safetensors")
    with pytest.raises(HistofmError, match="does not exist"):
        histofm.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "nope.bin")


def test_malicious_pickle_is_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(HistofmError, match="run code"):
        histofm.create_model("vit_tiny_patch16_224", depth=1, checkpoint_path=tmp_path / "evil.pth")


def test_official_dinov2_layout_converts(tmp_path) -> None:
    """A DINOv2-layout checkpoint (registers, w12/w3, cls position in pos_embed, 518 px) loads."""
    ours = histofm.create_model("vit_giant_patch14_reg4_dinov2", depth=2, embed_dim=96, num_heads=2, img_size=224).eval()
    _randomise(ours)
    sd = ours.state_dict()
    grid_pos = sd["pos_embed"]  # (1, 256, D) at 224 px
    cls_pos = torch.randn(1, 1, 96) * 0.05
    official = {}
    for k, v in sd.items():
        k2 = k.replace("reg_token", "register_tokens").replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        official[k2] = v.clone()
    official["cls_token"] = sd["cls_token"] - cls_pos
    official["pos_embed"] = torch.cat([cls_pos, grid_pos], dim=1)
    official["mask_token"] = torch.zeros(1, 96)
    torch.save(official, tmp_path / "dinov2.pth")
    loaded = histofm.create_model(
        "vit_giant_patch14_reg4_dinov2", depth=2, embed_dim=96, num_heads=2, img_size=224,
        checkpoint_path=tmp_path / "dinov2.pth",
    )
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), ours.forward_features(x), atol=1e-5, rtol=1e-5)


def test_dtype_bfloat16(tmp_path) -> None:
    m = histofm.create_model("vit_tiny_patch16_224", depth=1)
    save_file(m.state_dict(), tmp_path / "w.safetensors")
    b = histofm.create_model("vit_tiny_patch16_224", depth=1, checkpoint_path=tmp_path / "w.safetensors", dtype=torch.bfloat16)
    assert b.pos_embed.dtype == torch.bfloat16
    assert torch.isfinite(b(torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)).float()).all()


def test_grad_checkpointing_gives_same_gradients() -> None:
    m = VisionTransformer(patch_size=16, embed_dim=64, depth=3, num_heads=2, init_values=0.1)
    x = torch.randn(2, 3, 64, 64)
    m(x).square().sum().backward()
    ref = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).square().sum().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], atol=1e-6, rtol=1e-5)
