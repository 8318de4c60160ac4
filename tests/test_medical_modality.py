"""The DICOM modality worked example: crops, the split by file, features, kNN, pretraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from histofm import HistofmError
from histofm.medical.modality import (
    CropConfig,
    ModalityCrops,
    PretrainConfig,
    bundled_dicom_files,
    crops_from_slices,
    encoder_features,
    file_folds,
    histogram_features,
    knn_modality,
    modality_benchmark,
    modality_crops,
    pretrain_encoder,
)

SMALL = CropConfig(size=64, context=256, per_file=48, seed=0)  # the worked example's defaults
TINY_PRETRAIN = PretrainConfig(
    steps=12, batch_size=24, warmup_steps=2, lr=2e-3,
    backbone={"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
    method_overrides={"proj_hidden_dim": 64, "proj_dim": 32, "augment": "batch"},
)


@pytest.fixture(scope="module")
def crops() -> ModalityCrops:
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared CI machine
    return modality_crops(cfg=SMALL)


def test_crops_come_from_every_file_with_the_header_modality(crops: ModalityCrops) -> None:
    files = bundled_dicom_files()
    assert len(files) == 8
    assert crops.images.shape == (8 * SMALL.per_file, 64, 64, 3) and crops.images.dtype == np.uint8
    assert crops.classes == ["CR", "CT", "MR", "US"]
    # Oracle: the Modality tag read by pydicom itself, per crop.
    truth = {p.name: pydicom.dcmread(p, stop_before_pixels=True).Modality for p in files}
    for f, name in enumerate(crops.files):
        mine = crops.labels[crops.file_ids == f]
        assert len(mine) == SMALL.per_file
        assert {crops.classes[c] for c in mine} == {truth[name]}
    # Crops skip black background: most crops are mostly foreground.
    fg = (crops.images.max(-1) > SMALL.foreground_level).mean((1, 2))
    assert np.mean(fg >= SMALL.min_foreground) > 0.8


def test_crops_are_deterministic_for_a_seed() -> None:
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    slices = [np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)]
    cfg = CropConfig(size=16, context=40)
    a, b = crops_from_slices(slices, 5, cfg, rng_a), crops_from_slices(slices, 5, cfg, rng_b)
    assert a.shape == (5, 16, 16, 3) and np.array_equal(a, b)


def test_split_by_file_never_puts_a_file_on_both_sides(crops: ModalityCrops) -> None:
    folds = file_folds(crops)
    assert len(folds) == 2
    tested = np.zeros(len(crops), dtype=int)
    for tr, te in folds:
        assert not set(crops.file_ids[tr]) & set(crops.file_ids[te])
        assert set(crops.labels[tr]) == set(crops.labels[te]) == {0, 1, 2, 3}  # every modality on both sides
        assert len(set(crops.file_ids[te])) == 4  # one file of each modality is tested
        tested[te] += 1
    assert (tested == 1).all(), "every crop is tested exactly once over the folds"


def test_split_refuses_a_modality_with_a_single_file() -> None:
    cfg = CropConfig(size=16, context=32, per_file=2)
    files = [p for p in bundled_dicom_files() if p.name != "eCT_Supplemental.dcm"]  # one CT left
    with pytest.raises(HistofmError, match="CT has a single file"):
        file_folds(modality_crops(files, cfg))


def test_histogram_features_match_numpy(crops: ModalityCrops) -> None:
    feats = histogram_features(crops.images[:5], bins=16)
    assert feats.shape == (5, 48)
    for i in range(5):
        for c in range(3):
            ref, _ = np.histogram(crops.images[i, ..., c], bins=16, range=(0, 256))
            np.testing.assert_allclose(feats[i, 16 * c : 16 * (c + 1)], ref / ref.sum(), atol=1e-7)


def test_knn_modality_scores_separable_and_uninformative_features(crops: ModalityCrops) -> None:
    folds = file_folds(crops)
    rng = np.random.default_rng(0)
    separable = np.eye(4)[crops.labels] + 0.05 * rng.standard_normal((len(crops), 4))
    perfect = knn_modality(separable, crops, folds, "one-hot", k=5)
    assert perfect.fold_accuracy == (1.0, 1.0)
    assert np.array_equal(perfect.confusion, np.diag(np.bincount(crops.labels)))
    # Constant features: every test crop gets the same class, so balanced accuracy is exactly 1/4.
    const = knn_modality(np.ones((len(crops), 3)), crops, folds, "constant", k=5)
    assert const.fold_accuracy == (0.25, 0.25)
    assert const.confusion.sum() == len(crops)


def test_histogram_baseline_beats_chance(crops: ModalityCrops) -> None:
    result = knn_modality(histogram_features(crops.images), crops, file_folds(crops), "histogram")
    assert result.accuracy > 0.35, f"histogram kNN {result.fold_accuracy} should beat chance (0.25)"


def test_pretraining_lowers_the_loss_and_changes_the_encoder(crops: ModalityCrops) -> None:
    tr, _ = file_folds(crops)[0]
    backbone, history = pretrain_encoder(crops.images[tr], TINY_PRETRAIN)
    losses = [h["loss"] for h in history]
    assert len(losses) == TINY_PRETRAIN.steps and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert any("rankme" in h for h in history)
    from histofm.medical.modality import build_encoder

    init = build_encoder(TINY_PRETRAIN, 64)[0].backbone.eval()
    before, after = encoder_features(init, crops.images[:8]), encoder_features(backbone, crops.images[:8])
    assert before.shape == after.shape == (8, 64)  # class token + mean patch token
    assert np.abs(before - after).max() > 1e-3


def test_benchmark_reports_three_feature_sets(crops: ModalityCrops) -> None:
    bench = modality_benchmark(crops, TINY_PRETRAIN, k=10)
    assert list(bench.results) == ["histogram", "random", "ssl"]
    assert len(bench.histories) == 2  # one pretraining run per fold, on its training files only
    for r in bench.results.values():
        assert len(r.fold_accuracy) == 2 and all(0.0 <= a <= 1.0 for a in r.fold_accuracy)
        assert r.confusion.sum() == len(crops)
    table = bench.table()
    assert table.count("\n") == 4 and "intensity histogram" in table


def test_bad_inputs_get_one_clear_sentence(crops: ModalityCrops, tmp_path: Path) -> None:
    with pytest.raises(HistofmError, match="larger than the context"):
        crops_from_slices([np.zeros((40, 40, 3), np.uint8)], 1, CropConfig(size=64, context=32), np.random.default_rng(0))
    with pytest.raises(HistofmError, match="RGB crops"):
        histogram_features(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(HistofmError, match="feature rows"):
        knn_modality(np.zeros((3, 4)), crops, file_folds(crops))
    with pytest.raises(HistofmError, match="at least two RGB crops"):
        pretrain_encoder(np.zeros((1, 32, 32, 3), np.uint8), TINY_PRETRAIN)
    with pytest.raises(HistofmError, match="No DICOM files"):
        modality_crops([])
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not a dicom file")
    with pytest.raises(HistofmError, match="not a DICOM file"):
        modality_crops([bad])
