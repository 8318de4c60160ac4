"""ViT intermediates: ``forward_intermediates`` equals timm's, ``get_intermediate_layers`` follows DINOv2."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.models.vit import VisionTransformer

# (timm kwargs, our kwargs): class token, registers without class-embedded positions, no class token.
CONFIGS = {
    "class_token": (dict(patch_size=8, embed_dim=64, depth=3, num_heads=2), dict(patch_size=8, embed_dim=64, depth=3, num_heads=2)),
    "registers": (
        dict(patch_size=8, embed_dim=64, depth=3, num_heads=2, reg_tokens=4, no_embed_class=True, init_values=1e-2),
        dict(patch_size=8, embed_dim=64, depth=3, num_heads=2, reg_tokens=4, no_embed_class=True, init_values=1e-2),
    ),
    "no_class_token": (
        dict(patch_size=8, embed_dim=64, depth=3, num_heads=2, class_token=False, global_pool="avg", fc_norm=False),
        dict(patch_size=8, embed_dim=64, depth=3, num_heads=2, class_token=False, global_pool="avg"),
    ),
}


def _pair(name: str) -> tuple[nn.Module, VisionTransformer]:
    timm_kw, our_kw = CONFIGS[name]
    ref = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, dynamic_img_size=True,
        **{"global_pool": "token", **timm_kw},
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random values everywhere, norms near 1
        for pname, p in ref.named_parameters():
            p.copy_((1.0 if "norm" in pname and pname.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    ours = VisionTransformer(img_size=32, **our_kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(indices=2, norm=True),
        dict(indices=[2, 0], output_fmt="NLC"),  # block order, whatever the order asked
        dict(indices=[-1], return_prefix_tokens=True, stop_early=True),
        dict(indices=[1], intermediates_only=True, return_prefix_tokens=True, norm=True),
    ],
)
def test_forward_intermediates_matches_timm(name: str, kwargs: dict) -> None:
    ref, ours = _pair(name)
    x = torch.randn(2, 3, 32, 48)  # non-square: catches a swapped grid
    with torch.no_grad():
        expected, got = ref.forward_intermediates(x, **kwargs), ours.forward_intermediates(x, **kwargs)
    if not kwargs.get("intermediates_only"):
        _close(got[0], expected[0])
        expected, got = expected[1], got[1]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, tuple):
            assert isinstance(g, tuple)
            _close(g[0], e[0])
            _close(g[1], e[1])
        else:
            assert not isinstance(g, tuple)
            _close(g, e)


def test_final_features_equal_forward_features() -> None:
    _, ours = _pair("registers")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, inter = ours.forward_intermediates(x, indices=1)
        _close(final, ours.forward_features(x))
    assert inter[0].shape == (1, 64, 4, 4)


def test_get_intermediate_layers_dinov2_semantics() -> None:
    ref, ours = _pair("registers")
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        layers = ours.get_intermediate_layers(x, n=2, return_class_token=True)
        timm_normed = ref.forward_intermediates(x, indices=2, norm=True, return_prefix_tokens=True, output_fmt="NLC",
                                                intermediates_only=True)
        maps = ours.get_intermediate_layers(x, n=[0], reshape=True, norm=False)
        timm_raw = ref.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert len(layers) == 2
    for (patch, cls), (e_patch, e_prefix) in zip(layers, timm_normed):
        _close(patch, e_patch)  # registers and class token removed, final norm applied
        _close(cls, e_prefix[:, 0])
    assert layers[0][0].shape == (2, 20, 64)
    _close(maps[0], timm_raw[0])
    assert maps[0].shape == (2, 64, 4, 5)


def test_bad_arguments_are_refused() -> None:
    _, ours = _pair("no_class_token")
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(HistofmError, match="output_fmt"):
        ours.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(HistofmError, match="out of range"):
        ours.forward_intermediates(x, indices=[3])
    with pytest.raises(HistofmError, match="out of range"):
        ours.forward_intermediates(x, indices=4)
    with pytest.raises(HistofmError, match="class token"):
        ours.get_intermediate_layers(x, return_class_token=True)
    out = ours.forward_intermediates(x, return_prefix_tokens=True, intermediates_only=True)
    assert all(isinstance(t, torch.Tensor) for t in out)  # no prefix tokens: plain maps, as timm
