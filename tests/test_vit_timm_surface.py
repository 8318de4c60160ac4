"""Code written for timm's VisionTransformer works on ours: the same weights give the same answers.

Each part of timm's model surface (``forward_head``, ``reset_classifier``, ``num_features``,
``set_grad_checkpointing``, ``no_weight_decay``, ``group_matcher``) is compared with timm's
own ViT holding the same weights, over three layouts: a class token, four registers
without position embeddings on the prefix (DINOv2-reg), and no class token with
average pooling. timm's optimiser helpers are the oracle for the parameter groups.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from timm.models import group_parameters
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from histofm.errors import HistofmError
from histofm.models.vit import VisionTransformer

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
CONFIGS = {
    "class-token": dict(global_pool="token", num_classes=5),
    "registers": dict(global_pool="token", num_classes=3, reg_tokens=4, no_embed_class=True, init_values=1e-5),
    "avg-no-class-token": dict(global_pool="avg", num_classes=4, class_token=False),
}


def _pair(config: dict[str, Any]) -> tuple[VisionTransformer, TimmViT]:
    """Ours and timm's (final norm before pooling, as ours) with timm's random weights in both."""
    torch.manual_seed(0)
    ref = TimmViT(**SMALL, **config, fc_norm=False)
    ours = VisionTransformer(**SMALL, **config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref.eval()


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _names(model: torch.nn.Module, groups: list[dict[str, Any]]) -> list[tuple[float, float, list[str]]]:
    """timm's param groups as (lr_scale, weight_decay, parameter names), in a comparable order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    rows = [(g.get("lr_scale", 1.0), g["weight_decay"], sorted(name_of[id(p)] for p in g["params"])) for g in groups]
    return sorted(rows, key=lambda r: r[2])


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_forward_head_and_num_features_match_timm(config: dict[str, Any]) -> None:
    ours, ref = _pair(config)
    x = _image()
    with torch.no_grad():
        feats, ref_feats = ours.forward_features(x), ref.forward_features(x)  # (B, P + N, D)
        torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
        pooled = ours.forward_head(feats, pre_logits=True)  # (B, D)
        torch.testing.assert_close(pooled, ref.forward_head(ref_feats, pre_logits=True), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.forward_head(feats), ref.forward_head(ref_feats), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert ours.num_features == ref.num_features == pooled.shape[-1]
    assert ours.head_hidden_size == ref.head_hidden_size
    assert ours.get_classifier() is ours.head


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_reset_classifier_matches_timm(config: dict[str, Any]) -> None:
    ours, ref = _pair(config)
    x = _image()
    for num_classes, pool in [(0, None), (7, None), (2, "avg"), (0, "")]:
        ours.reset_classifier(num_classes, pool)
        ref.reset_classifier(num_classes, pool)
        assert type(ours.head) is type(ref.head)
        assert (ours.num_classes, ours.global_pool) == (ref.num_classes, ref.global_pool)
        if num_classes:
            assert ours.head.weight.shape == ref.head.weight.shape
            ours.head.load_state_dict(ref.head.state_dict())  # both heads are freshly random
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_reset_classifier_refuses_what_the_model_cannot_pool() -> None:
    ours, _ = _pair(CONFIGS["avg-no-class-token"])
    with pytest.raises(HistofmError, match="needs a class token"):
        ours.reset_classifier(3, "token")
    with pytest.raises(HistofmError, match="global_pool must be one of"):
        ours.reset_classifier(3, "max")  # type: ignore[arg-type]
    assert ours.global_pool == "avg" and ours.num_classes == 4  # a refused call changes nothing
    with_cls, _ = _pair(CONFIGS["class-token"])
    with_cls.reset_classifier(6, "token_avg")  # ours only: the Virchow embedding, 2 * D wide
    assert with_cls.num_features == 2 * SMALL["embed_dim"] and with_cls(_image()).shape == (2, 6)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_grad_checkpointing_matches_timm_and_recomputes(config: dict[str, Any]) -> None:
    ours, ref = _pair(config)
    ours.train().set_grad_checkpointing(True)
    ref.train().set_grad_checkpointing(True)
    calls = []
    ours.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early, before a post-hook
    x = _image()
    out, ref_out = ours(x), ref(x)
    (out.square().sum()).backward()
    (ref_out.square().sum()).backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2, "a checkpointed block runs again in backward"
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_no_weight_decay_and_group_matcher_give_timms_param_groups(config: dict[str, Any]) -> None:
    ours, ref = _pair(config)
    params = {n for n, _ in ref.named_parameters()}
    assert ours.no_weight_decay() & params == ref.no_weight_decay() & params
    for model in (ours, ref):  # timm's optimiser helpers read the model's own answers
        model.wd_groups = _names(model, param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay()))
        model.lld_groups = _names(
            model, param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.75)
        )
        model.blocks_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert ours.wd_groups == ref.wd_groups
    assert ours.lld_groups == ref.lld_groups
    assert ours.blocks_of == ref.blocks_of
    assert ours.group_matcher(coarse=True) == ours.group_matcher(coarse=False)


def test_the_mask_token_sits_in_the_stem_without_decay() -> None:
    ours = VisionTransformer(**SMALL, use_mask_token=True)
    groups = group_parameters(ours, ours.group_matcher(), reverse=True)
    assert groups["mask_token"] == groups["cls_token"] == groups["pos_embed"] == 0
    assert "mask_token" in ours.no_weight_decay()
