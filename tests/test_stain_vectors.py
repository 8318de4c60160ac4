"""Stain-vector jitter: the identity at zero tilt, and skimage's stain mixing as the oracle."""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import combine_stains, hed_from_rgb, rgb_from_hed, separate_stains

from histofm.data import sample_path
from histofm.data.stain_vectors import StainVectorJitter, perturb_stain_vectors


def _real_tile() -> torch.Tensor:
    from PIL import Image

    img = np.asarray(Image.open(sample_path("hgsc_nest")).convert("RGB"))[:64, :64].copy()
    return torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255  # (1, 3, 64, 64)


def test_zero_tilt_is_the_identity_and_p0_does_nothing() -> None:
    x = _real_tile()
    assert torch.allclose(perturb_stain_vectors(x, torch.zeros(1, 2, 3)), x, atol=2e-6)
    assert torch.equal(StainVectorJitter(0.3, p=0.0)(x[0]), x[0])


def test_tilted_mixing_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    stains = np.zeros((16, 16, 3))
    stains[..., :2] = rng.uniform(0, 0.15, (16, 16, 2))  # H and E only: unmixing is exact, nothing clamps
    rgb = combine_stains(stains, rgb_from_hed)  # (16, 16, 3) in [0, 1]
    noise = torch.from_numpy(rng.normal(0, 0.2, (1, 2, 3)))
    ours = perturb_stain_vectors(torch.from_numpy(rgb).permute(2, 0, 1)[None], noise)[0].permute(1, 2, 0).numpy()
    tilted = rgb_from_hed.copy()
    for s in range(2):
        norm = np.linalg.norm(tilted[s])
        v = np.maximum(tilted[s] / norm + noise[0, s].numpy(), 0)
        tilted[s] = v / np.linalg.norm(v) * norm
    want = combine_stains(separate_stains(rgb, hed_from_rgb), tilted)
    assert np.abs(ours - want).max() < 1e-5
    assert np.abs(ours - rgb).max() > 0.02  # the colours did change


def test_jitter_draws_differ_per_image_and_stay_in_range() -> None:
    torch.manual_seed(0)
    x = _real_tile().float().expand(4, -1, -1, -1)
    out = StainVectorJitter(0.15)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out[0], out[1])
