"""HoVer-Net pieces: HV targets, loss, UNETR decoder, post-processing, classical baseline, training, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.segmentation import watershed

from histofm import HistofmError
from histofm.cells.hovernet import (
    HoVerNetConfig,
    HoVerNetViT,
    _sobel_kernels,
    build_hovernet,
    hovernet_loss,
    hovernet_targets,
    hv_targets,
    msge_loss,
)
from histofm.cells.metrics import seg_stats
from histofm.cells.postprocess import (
    PostprocessConfig,
    classical_instances,
    hovernet_instances,
    instance_types,
)
from histofm.cells.train import (
    CellTrainConfig,
    CropSampler,
    load_cell_model,
    load_hgsc,
    save_cell_model,
    split_blocks,
    train_hovernet,
)
from histofm.models.unetr import UNETRDecoder, default_layer_indices
from histofm.models.vit import VisionTransformer

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 64}


def _touching_discs() -> np.ndarray:
    """Two overlapping discs split along the line of equal distance: one foreground blob, two nuclei."""
    yy, xx = np.mgrid[:48, :64]
    d1, d2 = np.hypot(yy - 24, xx - 22), np.hypot(yy - 24, xx - 40)
    inst = np.zeros((48, 64), np.int32)
    inst[(d1 < 11) | (d2 < 11)] = 1
    inst[(d2 < 11) & (d2 < d1)] = 2
    return inst


def test_hv_targets_shape_range_and_mirror_symmetry() -> None:
    inst = _touching_discs()
    hv = hv_targets(inst)
    assert hv.shape == (2, 48, 64) and hv.dtype == np.float32
    assert np.all(hv[:, inst == 0] == 0)
    for k in (1, 2):  # each nucleus spans exactly -1..1 in both directions
        for c in (0, 1):
            assert hv[c][inst == k].min() == pytest.approx(-1) and hv[c][inst == k].max() == pytest.approx(1)
    row = hv[0, 24, 12:33]  # along x inside nucleus 1: non-decreasing
    assert np.all(np.diff(row[inst[24, 12:33] == 1]) >= 0)
    flipped = hv_targets(inst[:, ::-1])  # mirroring x negates h, keeps v
    np.testing.assert_allclose(flipped[0], -hv[0][:, ::-1], atol=1e-6)
    np.testing.assert_allclose(flipped[1], hv[1][:, ::-1], atol=1e-6)
    t = hovernet_targets(inst, np.where(inst > 0, 3, 0))
    assert set(np.unique(t["np"])) == {0, 1} and set(np.unique(t["tp"])) == {0, 3}


def test_sobel_kernel_and_msge() -> None:
    kx, ky = _sobel_kernels(5)
    ramp = torch.arange(9.0).view(1, 1, 1, 9).expand(1, 1, 9, 9)
    assert torch.nn.functional.conv2d(ramp, kx[None, None])[0, 0].allclose(torch.tensor(1.0))  # d/dx of x is 1
    assert torch.nn.functional.conv2d(ramp, ky[None, None]).abs().max() < 1e-6
    hv = torch.from_numpy(hv_targets(_touching_discs()))[None]
    fg = torch.from_numpy(_touching_discs() > 0)[None]
    assert msge_loss(hv, hv, fg) == 0
    assert msge_loss(hv * 0.5, hv, fg) > 0


def test_unetr_decoder_shapes_and_errors() -> None:
    for patch, depth in ((8, 3), (16, 4)):
        vit = VisionTransformer(img_size=64, patch_size=patch, embed_dim=32, depth=depth, num_heads=2)
        dec = UNETRDecoder(32, patch, widths=[4 * 2**s for s in range(int(np.log2(patch)))])
        x = torch.randn(2, 3, 64, 48)
        feats = vit.forward_intermediates(x, indices=default_layer_indices(depth, dec.stages), intermediates_only=True)
        assert dec(x, feats).shape == (2, 4, 64, 48)
    assert default_layer_indices(12, 4) == [2, 5, 8, 11]  # CellViT's blocks 3, 6, 9, 12
    with pytest.raises(HistofmError, match="power-of-two"):
        UNETRDecoder(32, 14)
    with pytest.raises(HistofmError, match="at least"):
        default_layer_indices(2, 3)


def test_model_frozen_encoder_gets_no_gradient() -> None:
    model = build_hovernet(HoVerNetConfig(encoder_kwargs=TINY, widths=(8, 16, 32), tile=64)).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out["np"].shape == (2, 2, 64, 64) and out["hv"].shape == (2, 2, 64, 64) and out["tp"].shape == (2, 4, 64, 64)
    inst = np.stack([_touching_discs()[:, :64][:48]] * 2)
    inst = np.pad(inst, ((0, 0), (0, 16), (0, 0)))
    tgt = [hovernet_targets(i, np.where(i > 0, 1, 0)) for i in inst]
    target = {k: torch.from_numpy(np.stack([t[k] for t in tgt])) for k in tgt[0]}
    losses = hovernet_loss(out, target)
    losses["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("encoder."))
    assert not model.encoder.training  # a frozen encoder stays in eval mode
    with pytest.raises(HistofmError, match="multiples of the patch size"):
        model(torch.randn(1, 3, 60, 64))


def test_postprocess_splits_touching_nuclei_and_matches_skimage_on_oracle_maps() -> None:
    inst = _touching_discs()
    t = hovernet_targets(inst)
    pred = hovernet_instances(t["np"].astype(float), t["hv"], PostprocessConfig(ksize=5, min_size=5))
    assert ndimage.label(inst > 0)[1] == 1  # the foreground alone is one blob
    assert pred.max() == 2  # the HV maps separate it
    assert seg_stats(inst, pred).metrics()["pq"] > 0.85
    # The distance-transform watershed of scikit-image with the true centres as markers: the same split.
    markers = np.zeros_like(inst)
    markers[24, 22], markers[24, 40] = 1, 2
    ref = watershed(-ndimage.distance_transform_edt(inst > 0), markers, mask=inst > 0)
    assert seg_stats(ref, pred).metrics()["pq"] > 0.85
    probs = np.zeros((4,) + inst.shape)
    probs[2] = 0.9
    probs[1] = 0.1
    types, p = instance_types(pred, probs)
    assert list(types) == [2, 2] and np.allclose(p, 0.9)
    assert hovernet_instances(np.zeros((8, 8)), np.zeros((2, 8, 8))).max() == 0


def test_classical_baseline_finds_dark_nuclei() -> None:
    inst = _touching_discs()
    img = np.full(inst.shape + (3,), (235, 200, 220), np.uint8)  # pink background
    img[inst > 0] = (80, 40, 140)  # haematoxylin-purple nuclei
    pred = classical_instances(img, min_size=5, min_distance=8)
    assert pred.max() == 2
    assert seg_stats(inst, pred).metrics()["pq"] > 0.8


def test_split_blocks_is_the_nucleus_task_checkerboard() -> None:
    train, test = split_blocks((1500, 1500), True), split_blocks((1500, 1500), False)
    assert len(train) == 5 and len(test) == 4
    assert (0, 0, 500, 500) in train and (0, 500, 500, 1000) in test


def test_training_lowers_the_loss_and_checkpoint_round_trip(tmp_path) -> None:
    image, inst, types = load_hgsc()
    cfg = HoVerNetConfig(encoder_kwargs=TINY, widths=(8, 16, 32), tile=64, freeze_encoder=False)
    torch.manual_seed(0)
    model = build_hovernet(cfg)
    sampler = CropSampler(image, inst, types, split_blocks(inst.shape, True), 64, cfg.mean, cfg.std, seed=0)
    x, tgt = sampler.batch(2)
    assert x.shape == (2, 3, 64, 64) and tgt["hv"].shape == (2, 2, 64, 64)
    hist = train_hovernet(model, sampler, CellTrainConfig(steps=40, batch_size=4, lr=3e-3), out_dir=tmp_path / "run")
    first, last = np.mean([h["loss"] for h in hist[:5]]), np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    path = save_cell_model(model, cfg, tmp_path / "cells.safetensors")
    again, cfg2 = load_cell_model(path)
    assert cfg2 == cfg and isinstance(again, HoVerNetViT)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model.eval()(x), again(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_bad_checkpoints_are_refused(tmp_path) -> None:
    with pytest.raises(HistofmError, match="not found"):
        load_cell_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(HistofmError, match="not a readable safetensors"):
        load_cell_model(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "encoder.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(HistofmError, match="not a histofm cell model"):
        load_cell_model(plain)
    with pytest.raises(HistofmError, match="type_names"):
        HoVerNetConfig(num_types=2)
