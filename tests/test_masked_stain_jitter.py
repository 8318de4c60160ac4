"""The masked-image methods (MAE, SimMIM, BEiT) take HED stain jitter as a setting, off by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from histofm.data.stain import HEDJitter
from histofm.errors import HistofmError
from histofm.methods.registry import build_method

_VIT = {"depth": 1, "patch_size": 8, "embed_dim": 32, "num_heads": 2}


def _tile() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(60, 220, (32, 32, 3), dtype=np.uint8))


def _views(method: str, **hed) -> torch.Tensor:
    _, transform = build_method(method, "vit_tiny_patch16_224", img_size=32,
                                overrides={"preset": "cpu_small", "backbone": _VIT, "crop_scale": (1.0, 1.0), **hed})
    torch.manual_seed(0)
    return torch.stack([transform(_tile()) for _ in range(8)])  # (8, 3, 32, 32)


@pytest.mark.parametrize("method", ["mae", "simmim", "beit"])
def test_hed_jitter_setting_changes_the_stain_only_when_asked(method: str) -> None:
    plain = _views(method)
    assert not any(isinstance(t, HEDJitter) for t in _views_transforms(method))
    jittered = _views(method, hed_p=1.0, hed_sigma=0.5, hed_bias=0.05)
    assert any(isinstance(t, HEDJitter) for t in _views_transforms(method, hed_p=1.0))
    # The crop covers the whole tile, so views differ only by flips, which keep each channel's mean: every plain view
    # has the same colour, while each jittered view gets its own stain.
    plain_colour, jittered_colour = plain.mean(dim=(2, 3)), jittered.mean(dim=(2, 3))  # (8, 3)
    assert plain_colour.std(0).max() < 1e-3, plain_colour
    assert jittered_colour.std(0).min() > 0.02, jittered_colour


def _views_transforms(method: str, **hed) -> list:
    _, transform = build_method(method, "vit_tiny_patch16_224", img_size=32,
                                overrides={"preset": "cpu_small", "backbone": _VIT, **hed})
    return list(transform.transforms)


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_bad_hed_setting_is_one_sentence(method: str) -> None:
    with pytest.raises(HistofmError, match="hed_p"):
        build_method(method, "vit_tiny_patch16_224", img_size=32,
                     overrides={"preset": "cpu_small", "backbone": _VIT, "hed_p": 1.5})
