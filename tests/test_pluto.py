"""PLUTO recipe: Fourier loss against a direct formula, per-step patch size, multi-scale tiles, a short run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from histofm import HistofmError
from histofm.data.datasets import bundled_tiles
from histofm.methods.patches import patchify
from histofm.methods.pluto import PLUTO, MultiScaleTile, build, fourier_amplitude_loss
from histofm.methods.registry import build_method
from histofm.train import TrainConfig, fit

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
OVERRIDES = {"preset": "cpu_small", "backbone_kwargs": TINY, "out_dim": 256, "patch_out_dim": 256}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine
    # two spinning OpenMP threads per process slow these runs down ten-fold.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference_fourier(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, p: int, C: int) -> float:
    vals = []
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            if not mask[b, i]:
                continue
            a = pred[b, i].reshape(p, p, C).transpose(2, 0, 1)
            t = target[b, i].reshape(p, p, C).transpose(2, 0, 1)
            fa = np.abs(np.fft.rfft2(a, norm="ortho"))
            ft = np.abs(np.fft.rfft2(t, norm="ortho"))
            vals.append(np.abs(np.log1p(fa) - np.log1p(ft)).mean())
    return float(np.mean(vals))


@pytest.mark.parametrize("p", [4, 8])
def test_fourier_loss_matches_a_direct_numpy_formula(p) -> None:
    g = torch.Generator().manual_seed(p)
    pred, target = torch.randn(2, 6, p * p * 3, generator=g, dtype=torch.float64), torch.randn(2, 6, p * p * 3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 6, generator=g) < 0.5
    mask[0, 0] = True
    ours = fourier_amplitude_loss(pred, target, mask, p, 3, eps=0.0)
    assert float(ours) == pytest.approx(_reference_fourier(pred.numpy(), target.numpy(), mask.numpy(), p, 3), rel=1e-6)


def test_fourier_loss_ignores_position_but_penalises_lost_texture() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, 8, 8, generator=g)
    target = patchify(img, 8)
    mask = torch.ones(1, 1, dtype=torch.bool)
    shifted = patchify(torch.roll(img, shifts=(3, 2), dims=(2, 3)), 8)  # same texture, elsewhere (circularly)
    blurred = patchify(torch.nn.functional.avg_pool2d(img, 3, 1, 1, count_include_pad=False), 8)
    f_shift = fourier_amplitude_loss(shifted, target, mask, 8)
    f_blur = fourier_amplitude_loss(blurred, target, mask, 8)
    mse_shift = (shifted - target).pow(2).mean()
    mse_blur = (blurred - target).pow(2).mean()
    assert float(f_shift) < 1e-3 < float(f_blur)  # amplitude spectra: the shift costs nothing, the blur does
    assert float(mse_shift) > float(mse_blur)  # while pixel MSE prefers the blur: the two losses disagree


def test_patch_size_is_drawn_per_step_from_the_step_alone() -> None:
    a, _ = build("pluto", "pluto", img_size=64, overrides=OVERRIDES)
    b, _ = build("pluto", "pluto", img_size=64, overrides=OVERRIDES)
    sizes = [a.patch_size_for_step(s) for s in range(60)]
    assert sizes == [b.patch_size_for_step(s) for s in range(60)]  # every rank / a resumed run agrees
    assert set(sizes) == {8, 16, 32} and max(sizes.count(p) for p in (8, 16, 32)) < 35


def test_multiscale_tiles_read_the_field_of_view_of_each_magnification() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8))
    t = MultiScaleTile(64, mpps=(0.25, 0.5, 1.0, 2.0), source_mpp=0.5)
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        out = t(img)
        assert out.size == (64, 64)
        seen.add(t.last_mpp)
    assert seen == {0.25, 0.5, 1.0, 2.0}  # 2 um/px needs a 256 px region: fits
    small = Image.fromarray((rng.random((100, 100, 3)) * 255).astype(np.uint8))
    for _ in range(20):
        t(small)
        assert t.last_mpp in (0.25, 0.5)  # 1 and 2 um/px need 128 / 256 px: skipped
    # zooming: at 0.25 um/px a constant-colour quadrant fills the whole output
    quad = np.zeros((256, 256, 3), np.uint8)
    quad[:128, :128] = 255
    t1 = MultiScaleTile(64, mpps=(2.0,), source_mpp=0.5)
    assert abs(np.asarray(t1(Image.fromarray(quad))).mean() / 255 - 0.25) < 0.02  # the whole field, shrunk


def test_same_weights_give_finite_embeddings_at_8_16_32_and_a_short_run_trains(tmp_path) -> None:
    torch.manual_seed(0)
    method, transform = build_method("pluto", "pluto", img_size=64, overrides=OVERRIDES)
    assert isinstance(method, PLUTO)
    tiles = bundled_tiles(128, sources=("hgsc_nest", "hgsc_stroma"), stride=96)
    cfg = TrainConfig(steps=24, batch_size=8, lr=2e-3, warmup_steps=3, progress=False, monitor_every=0, out_dir=str(tmp_path))
    hist = fit(method, tiles, cfg, transform=transform)
    assert {h["patch_size"] for h in hist} == {8.0, 16.0, 32.0}
    first, last = np.mean([h["loss"] for h in hist[:6]]), np.mean([h["loss"] for h in hist[-6:]])
    assert last < first - 0.5, (first, last)
    mae_first, mae_last = np.mean([h["mae_loss"] for h in hist[:6]]), np.mean([h["mae_loss"] for h in hist[-6:]])
    assert mae_last < mae_first, (mae_first, mae_last)
    assert all(np.isfinite(h["fourier_loss"]) for h in hist)
    x = torch.stack([transform.crops(transform.scale(tiles[i]))[0] for i in range(4)])  # global crops (4, 3, 64, 64)
    backbone = method.backbone
    embs = {}
    with torch.no_grad():
        for p in (8, 16, 32):
            embs[p] = backbone(x, patch_size=p)
            assert embs[p].shape == (4, 64) and torch.isfinite(embs[p]).all()
    assert not torch.allclose(embs[8], embs[32])  # really different token grids
    assert (tmp_path / "backbone.safetensors").is_file()


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(HistofmError, match="FlexiViT"):
        build("pluto", "vit_tiny_patch16_224", img_size=64, overrides={"preset": "cpu_small", "backbone_kwargs": TINY})
    with pytest.raises(HistofmError, match="multiple of the patch size"):
        build("pluto", "pluto", img_size=48, overrides=OVERRIDES)
    with pytest.raises(HistofmError, match="too few for MAE"):
        build("pluto", "pluto", img_size=32, overrides=OVERRIDES)
    with pytest.raises(HistofmError, match="Unknown option"):
        build("pluto", "pluto", img_size=64, overrides={**OVERRIDES, "fourier_wieght": 1.0})
