"""MAE: the published loss, exact per-sample masking, visible-only encoder, and a short run on real tiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import histofm
from histofm import HistofmError
from histofm.methods.mae import MAE, MAEConfig, build
from histofm.methods.patches import encode_visible, mae_loss, patchify, random_masking, unpatchify
from histofm.methods.pictures import save_reconstructions
from histofm.methods.registry import build_method

TINY = {"depth": 2, "patch_size": 8, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine
    # two spinning OpenMP threads per process slow these runs down ten-fold.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference_mae_loss(pred: np.ndarray, imgs: np.ndarray, mask: np.ndarray, p: int, norm_pix: bool) -> float:
    """He et al. 2021, written out patch by patch: norm-pix target, MSE per patch, mean over masked patches."""
    B, C, H, W = imgs.shape
    total, count = 0.0, 0
    for b in range(B):
        i = 0
        for r in range(H // p):
            for c in range(W // p):
                patch = imgs[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p].transpose(1, 2, 0).reshape(-1)  # (p, p, C)
                if mask[b, i]:
                    t = patch
                    if norm_pix:
                        t = (patch - patch.mean()) / math.sqrt(patch.var(ddof=1) + 1e-6)
                    total += float(((pred[b, i] - t) ** 2).mean())
                    count += 1
                i += 1
    return total / count


@pytest.mark.parametrize("B,C,size,p,norm_pix", [(2, 3, 32, 8, True), (3, 3, 24, 4, True), (2, 1, 16, 4, False)])
def test_mae_loss_matches_the_published_formula(B, C, size, p, norm_pix) -> None:
    g = torch.Generator().manual_seed(B * 100 + p)
    imgs = torch.randn(B, C, size, size, generator=g, dtype=torch.float64)
    N = (size // p) ** 2
    pred = torch.randn(B, N, p * p * C, generator=g, dtype=torch.float64)
    mask = torch.rand(B, N, generator=g) < 0.6
    mask[:, 0] = True
    ours = mae_loss(pred, patchify(imgs, p), mask, norm_pix=norm_pix)
    ref = _reference_mae_loss(pred.numpy(), imgs.numpy(), mask.numpy(), p, norm_pix)
    assert float(ours) == pytest.approx(ref, rel=1e-10)


def test_patchify_order_and_roundtrip() -> None:
    x = torch.randn(2, 3, 16, 24)
    patches = patchify(x, 8)  # (2, 6, 192)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    # patch (row 1, col 2) = index 1 * 3 + 2, pixels in (p, p, C) order
    torch.testing.assert_close(patches[1, 5], x[1, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(patches, 8, (2, 3)), x)


@pytest.mark.parametrize("N,ratio,keep", [(16, 0.75, 4), (49, 0.75, 12), (196, 0.75, 49), (64, 0.5, 32), (10, 0.9, 1)])
def test_random_masking_keeps_exactly_the_requested_number(N, ratio, keep) -> None:
    B = 32
    ids_keep, mask, ids_restore = random_masking(B, N, ratio, generator=torch.Generator().manual_seed(N))
    assert ids_keep.shape == (B, keep)
    assert (mask.sum(1) == N - keep).all()  # exactly per sample, not on average
    for b in range(B):  # the kept ids are exactly the unmasked positions
        assert set(ids_keep[b].tolist()) == set((~mask[b]).nonzero().flatten().tolist())
    # ids_restore inverts the shuffle: shuffled position of patch i is ids_restore[i]
    shuffle = ids_restore.argsort(1)
    assert torch.equal(shuffle[:, :keep], ids_keep)
    assert len({tuple(m.tolist()) for m in mask}) >= min(B, N) // 2  # masks differ between samples


def test_encoder_sees_only_the_visible_patches() -> None:
    torch.manual_seed(0)
    vit = histofm.create_model("vit_tiny_patch16_224", img_size=32, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    ids_keep, mask, _ = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    pix_mask = unpatchify(mask[..., None].float().expand(-1, -1, 8 * 8 * 3), 8, (4, 4)).bool()
    y = torch.where(pix_mask, torch.randn_like(x) * 5, x)  # change only the masked patches
    with torch.no_grad():
        a, b = encode_visible(vit, x, ids_keep), encode_visible(vit, y, ids_keep)
        c = encode_visible(vit, x + 0.1 * ~pix_mask, ids_keep)  # change a visible patch: output changes
    assert a.shape == (2, 1 + 4, 64)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_mae_forward_backward_and_decoder_positions_are_fixed() -> None:
    method, transform = build("mae", "vit_tiny_patch16_224", img_size=32, overrides={"preset": "cpu_small", "backbone": TINY})
    out = method(torch.randn(4, 3, 32, 32))
    assert set(out) >= {"loss", "mask_ratio"} and float(out["mask_ratio"]) == 0.75
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None]
    assert missing == []
    assert not any("pos" in n for n, _ in method.decoder.named_parameters())  # sin-cos, not learned
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    assert transform(img).shape == (3, 32, 32)


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(HistofmError, match="mask_ratio"):
        random_masking(2, 16, 1.0)
    with pytest.raises(HistofmError, match="no visible patch"):
        random_masking(2, 3, 0.75)
    with pytest.raises(HistofmError, match="multiple of the patch size"):
        patchify(torch.zeros(1, 3, 30, 30), 8)
    with pytest.raises(HistofmError, match="Unknown option"):
        build_method("mae", "vit_tiny_patch16_224", img_size=32, overrides={"mask_ration": 0.5})
    method = MAE(histofm.create_model("vit_tiny_patch16_224", img_size=32, **TINY), MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2))
    with pytest.raises(HistofmError, match="batch of images"):
        method([torch.zeros(3, 32, 32)])


def test_reconstruction_picture_is_written_atomically(tmp_path) -> None:
    method, _ = build("mae", "vit_tiny_patch16_224", img_size=32, overrides={"preset": "cpu_small", "backbone": TINY})
    pics = method.reconstruct(torch.randn(3, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert {"input", "masked", "output", "pasted", "mse"} <= set(pics)
    assert all(0 <= float(pics[k].min()) and float(pics[k].max()) <= 1 for k in ("input", "masked", "output", "pasted"))
    path = save_reconstructions(pics, tmp_path / "r.png", "title")
    assert Image.open(path).format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]  # no temporary file left behind



def _mean_fill_error(x: torch.Tensor, mask: torch.Tensor, p: int) -> float:
    """Masked-patch MSE of the trivial painter: every hidden pixel gets the mean colour of the visible ones."""
    patches = patchify(x, p)  # (B, N, p*p*C)
    B, N, _ = patches.shape
    pix = patches.reshape(B, N, p * p, -1)  # (B, N, p*p, C)
    vis_mean = (pix * (~mask)[..., None, None]).sum(dim=(1, 2)) / ((~mask).sum(1)[:, None] * p * p)  # (B, C)
    fill = vis_mean[:, None, None, :].expand_as(pix).reshape(B, N, -1)
    return float(mae_loss(fill, patches, mask, norm_pix=False))


def test_short_run_on_real_tiles_reconstructs_held_out_tiles_better(tmp_path) -> None:
    # Whether MAE features gain in kNN is measured on the nucleus task in tests/test_learning.py.
    from histofm.train import TrainConfig, fit
    from ssl_check import SIZE, knn_data, pretrain_tiles, tiny_vit_kwargs

    torch.manual_seed(0)
    method, views = build("mae", "vit_tiny_patch16_224", img_size=SIZE, overrides={"preset": "cpu_small", "backbone": tiny_vit_kwargs()})
    held_out = knn_data()[2][::3]  # tiles from the bottom rows of each field, never trained on
    fixed = held_out[::17][:8]  # the ones drawn in the pictures
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same masks before and after
    before = method.reconstruct(held_out, gen())
    callback = method.attach_reconstructions(fixed, tmp_path, every=100)
    cfg = TrainConfig(steps=200, batch_size=32, lr=3e-3, warmup_steps=20, weight_decay=0.05, progress=False, monitor_every=0)
    hist = fit(method, pretrain_tiles(), cfg, transform=views)
    after = method.reconstruct(held_out, gen())
    _, mask, _ = random_masking(len(held_out), (SIZE // 8) ** 2, 0.75, generator=gen())
    baseline = _mean_fill_error(held_out, mask, 8)
    print(f"MAE held-out masked MSE {float(before['mse']):.3f} -> {float(after['mse']):.3f} (mean-colour fill {baseline:.3f})")
    assert np.mean([h["loss"] for h in hist[-20:]]) < 0.5 * np.mean([h["loss"] for h in hist[:20]])
    # held-out reconstructions improve, and beat painting the hidden patches with the visible mean colour
    assert float(after["mse"]) < min(0.5 * float(before["mse"]), 0.95 * baseline)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["recon_step0.png", "recon_step100.png", "recon_step200.png"]
    assert [s for s, _ in callback.history] == [0, 100, 200]
