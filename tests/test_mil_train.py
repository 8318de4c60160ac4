"""Slide-level training from features files: patient-grouped CV, outputs, heatmap on the real slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from histofm import HistofmError
from histofm.cli import main
from histofm.data import sample_path
from histofm.mil.heatmap import paint, percentiles, render_heatmap, tile_size_level0
from histofm.mil.train import load_trained, make_folds, read_labels_csv

SLIDE_W, SLIDE_H = 2220, 2967  # the bundled cmu_small_region.svs
TILE = 224
D = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grid() -> np.ndarray:
    xs, ys = np.arange(0, SLIDE_W - TILE, TILE), np.arange(0, SLIDE_H - TILE, TILE)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)  # (N, 2) level-0 top-left corners


def _write_slide(path: Path, positive: bool, rng: np.random.Generator) -> None:
    coords = _grid()
    feats = rng.normal(size=(len(coords), D)).astype(np.float32)
    if positive:  # the decisive tiles sit in the top-left corner of the slide
        planted = (coords[:, 0] < 700) & (coords[:, 1] < 700)
        feats[planted, 0] += 4.0
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        dset = f.create_dataset("coords", data=coords.astype(np.int64))
        dset.attrs["patch_size_level0"] = TILE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mil")
    feats = root / "features"
    feats.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):  # 12 patients with two slides each; the label is per patient
        patient = f"P{i // 2:02d}"
        label = "tumour" if (i // 2) % 2 else "normal"
        _write_slide(feats / f"S{i:02d}.h5", label == "tumour", rng)
        rows.append([f"S{i:02d}", label, patient])
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "label", "patient_id"], *rows])
    return feats, labels


@pytest.fixture(scope="module")
def trained(dataset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    feats, labels = dataset
    out = tmp_path_factory.mktemp("run")
    rc = main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--model", "abmil",
               "--folds", "3", "--epochs", "30", "--batch-size", "4", "--lr", "3e-3", "--option", "hidden_dim=16",
               "--option", "attn_dim=8", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    return out


def test_cross_validation_outputs_and_learning(trained: Path, dataset: tuple[Path, Path]) -> None:
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["model"] == "abmil" and cfg["class_names"] == ["normal", "tumour"] and cfg["in_dim"] == D
    with open(trained / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["slide_id"] for r in rows) == [f"S{i:02d}" for i in range(24)]  # each slide tested once
    folds_of_patient: dict[str, set[str]] = {}
    for r in rows:
        folds_of_patient.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of_patient.values())  # no patient on both sides of a split
    accuracy = np.mean([r["label"] == r["pred"] for r in rows])
    metrics = json.loads((trained / "metrics.json").read_text())
    assert len(metrics["folds"]) == 3
    assert metrics["mean"]["auroc"] >= 0.95 and accuracy >= 0.9, (metrics, accuracy)
    models, _ = load_trained(trained)
    assert len(models) == 3 and not models[0].training
    assert list(trained.glob("*.tmp")) == []


def test_heatmap_on_the_real_slide(trained: Path, dataset: tuple[Path, Path]) -> None:
    feats, _ = dataset
    png = trained / "heatmap.png"
    assert main(["mil", "heatmap", "--features", str(feats / "S03.h5"), "--slide", str(sample_path("cmu_small_region")),
                 "--model-dir", str(trained), "--size", "512", "--out", str(png)]) == 0
    img = Image.open(png)
    assert img.format == "PNG" and min(img.size) > 200
    result = render_heatmap(sample_path("cmu_small_region"), feats / "S03.h5", trained, trained / "h2.png", max_size=512)
    heat = result["heat"]
    assert result["probabilities"]["tumour"] > 0.5
    h, w = heat.shape
    assert max(h, w) == 512
    corner = heat[: int(700 / SLIDE_H * h) - 2, : int(700 / SLIDE_W * w) - 2]  # where the planted tiles are
    assert np.nanmean(corner) > 0.9 > np.nanmean(heat)


def test_paint_geometry() -> None:
    coords = np.array([[0, 0], [100, 0], [0, 100]])
    heat = paint(coords, np.array([1.0, 0.5, 0.0]), 100, (200, 200), (20, 20))
    assert heat[0, 0] == 1.0 and heat[0, 15] == 0.5 and heat[15, 0] == 0.0 and np.isnan(heat[15, 15])
    assert tile_size_level0(coords, {}) == 100 and tile_size_level0(coords, {"patch_size_level0": 64}) == 64
    np.testing.assert_allclose(percentiles(np.array([3.0, 1.0, 2.0, 2.0])), [1.0, 0.0, 0.5, 0.5])


def test_folds_are_grouped_and_stratified() -> None:
    labels = np.array([0, 0, 1, 1] * 5)
    patients = [f"p{i // 2}" for i in range(20)]
    splits = make_folds(labels, patients, 5)
    seen = np.concatenate([te for _, te in splits])
    assert sorted(seen.tolist()) == list(range(20))
    for tr, te in splits:
        assert not {patients[i] for i in tr} & {patients[i] for i in te}
        assert set(labels[te]) == {0, 1}
    with pytest.raises(HistofmError, match="fewer than the 6 folds"):
        make_folds(labels, patients, 6)


def test_bad_input(tmp_path: Path, dataset: tuple[Path, Path], trained: Path, capsys: pytest.CaptureFixture) -> None:
    feats, labels = dataset
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\nS00,a\n")
    with pytest.raises(HistofmError, match="slide_id and label"):
        read_labels_csv(bad)
    bad.write_text("slide_id,label\nS00,a\nS01,a\n")
    with pytest.raises(HistofmError, match="single label"):
        read_labels_csv(bad)
    bad.write_text("slide_id,label\nS00,a\nS99,b\n")
    assert main(["mil", "train", "--features", str(feats), "--labels", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "no features file" in capsys.readouterr().err
    assert main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--model", "abmill",
                 "--out", str(tmp_path / "o")]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("features", data=np.zeros((3, D + 1), np.float32))
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    assert main(["mil", "heatmap", "--features", str(wrong), "--slide", str(sample_path("cmu_small_region")),
                 "--model-dir", str(trained), "--out", str(tmp_path / "h.png")]) == 2
    assert "same encoder" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()
