"""Slide-level training from features files: patient-grouped CV, outputs, heatmap on the real slide, predict."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from histofm import HistofmError
from histofm.cli import main
from histofm.data import sample_path
from histofm.mil.cv import make_folds, validation_split
from histofm.mil.data import find_features, read_labels_csv
from histofm.mil.heatmap import paint, percentiles, render_heatmap, tile_size_level0
from histofm.mil.run import load_trained
from histofm.wsi.provenance import slide_fingerprint

SLIDE_W, SLIDE_H = 2220, 2967  # the bundled cmu_small_region.svs
TILE = 224
D = 8
PROVENANCE = {"model_name": "toy_encoder", "mpp": 0.5, "tile_size": 224, "overlap": 0, "embed_dim": D}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grid() -> np.ndarray:
    xs, ys = np.arange(0, SLIDE_W - TILE, TILE), np.arange(0, SLIDE_H - TILE, TILE)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)  # (N, 2) level-0 top-left corners


def write_slide(path: Path, positive: bool, rng: np.random.Generator, **attrs: object) -> None:
    coords = _grid()
    feats = rng.normal(size=(len(coords), D)).astype(np.float32)
    if positive:  # the decisive tiles sit in the top-left corner of the slide
        planted = (coords[:, 0] < 700) & (coords[:, 1] < 700)
        feats[planted, 0] += 4.0
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        dset = f.create_dataset("coords", data=coords.astype(np.int64))
        dset.attrs["patch_size_level0"] = TILE
        for k, v in {**PROVENANCE, "slide": f"{path.stem}.svs", "level0_mpp": 0.5, **attrs}.items():
            f.attrs[k] = v


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
        write_slide(feats / f"S{i:02d}.h5", label == "tumour", rng)
        rows.append([f"S{i:02d}.svs" if i % 3 == 0 else f"S{i:02d}", label, patient])  # ids with or without extension
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "label", "patient_id"], *rows])
    return feats, labels


@pytest.fixture(scope="module")
def trained(dataset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    feats, labels = dataset
    out = tmp_path_factory.mktemp("run")
    rc = main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--aggregator", "abmil",
               "--folds", "3", "--epochs", "30", "--batch-size", "4", "--lr", "3e-3", "--set", "hidden_dim=16",
               "--set", "attn_dim=8", "--set", "val_fraction=0.25", "--set", "patience=8", "--set", "n_boot=200",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    return out


def test_cross_validation_outputs_and_learning(trained: Path) -> None:
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["aggregator"] == "abmil" and cfg["class_names"] == ["normal", "tumour"] and cfg["in_dim"] == D
    assert cfg["provenance"] == PROVENANCE  # recorded from the files; "slide" and level0_mpp are per slide
    with open(trained / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["slide_id"]).stem for r in rows) == [f"S{i:02d}" for i in range(24)]  # each tested once
    folds_of_patient: dict[str, set[str]] = {}
    for r in rows:
        folds_of_patient.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of_patient.values())  # no patient on both sides of a split
    accuracy = np.mean([r["label"] == r["pred"] for r in rows])
    metrics = json.loads((trained / "metrics.json").read_text())
    assert len(metrics["folds"]) == 3
    assert metrics["mean"]["auroc"] >= 0.95 and accuracy >= 0.9, (metrics, accuracy)
    for m in [*metrics["folds"], metrics["pooled"]]:  # every metric has an interval that contains it
        for k in ("balanced_accuracy", "macro_f1"):
            lo, hi = m[f"{k}_ci"]
            assert lo <= m[k] <= hi, (k, m)
    assert metrics["pooled"]["balanced_accuracy"] == pytest.approx(
        np.mean([np.mean([r["pred"] == c for r in rows if r["label"] == c]) for c in ("normal", "tumour")]))
    for m in metrics["folds"]:  # the validation patients came out of the training part
        assert m["n_val"] > 0 and m["n_train"] + m["n_val"] + m["n_test"] == 24
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert {r["fold"] for r in log} == {0, 1, 2} and all(r["val_loss"] is not None for r in log)
    first = [r for r in log if r["fold"] == 0]
    assert first[-1]["train_loss"] < first[0]["train_loss"]
    models, _ = load_trained(trained)
    assert len(models) == 3 and not models[0].training
    assert list(trained.glob("*.tmp")) == [] and list(trained.glob(".*.tmp")) == []


def test_heatmap_on_the_real_slide(trained: Path, dataset: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    feats, _ = dataset
    out = tmp_path / "maps"
    # Features that record the real slide's fingerprint are refused on another slide, drawn on a renamed copy
    slide = tmp_path / "renamed.svs"
    shutil.copy(sample_path("cmu_small_region"), slide)
    stamped = tmp_path / "stamped" / "S03.h5"
    stamped.parent.mkdir()
    shutil.copy(feats / "S03.h5", stamped)
    with h5py.File(stamped, "a") as f:
        f.attrs["slide_fingerprint"] = slide_fingerprint(slide)
    other = main(["mil", "heatmap", "--features", str(stamped), "--slide", str(sample_path("hgsc_nest")),
                  "--run", str(trained), "--out", str(tmp_path / "wrong")])
    assert other == 2 and "holds the tiles of slide 'S03.svs', not hgsc_nest.jpg" in capsys.readouterr().err
    assert not (tmp_path / "wrong").exists()
    assert main(["mil", "heatmap", "--features", str(stamped), "--slide", str(slide), "--run", str(trained),
                 "--out", str(tmp_path / "renamed_ok")]) == 0
    capsys.readouterr()
    assert main(["mil", "heatmap", "--features", str(feats / "S03.h5"), "--slide", str(slide),
                 "--run", str(trained), "--size", "512", "--out", str(out)]) == 0
    manifest = json.loads((trained / "run.json").read_text())
    held = next(f["fold"] for f in manifest["folds"] if "S03.svs" in f["test_slides"] or "S03" in f["test_slides"])
    assert f"fold {held} (held out this training slide)" in capsys.readouterr().out
    img = Image.open(out / "S03_heatmap.png")
    assert img.format == "PNG" and min(img.size) > 200
    result = render_heatmap(slide, feats / "S03.h5", trained, out, max_size=512)
    heat = result["heat"]
    assert result["probabilities"]["tumour"] > 0.5 and result["models"].startswith(f"fold {held}")
    h, w = heat.shape
    assert max(h, w) == 512
    corner = heat[: int(700 / SLIDE_H * h) - 2, : int(700 / SLIDE_W * w) - 2]  # where the planted tiles are
    assert np.nanmean(corner) > 0.9 > np.nanmean(heat)
    with h5py.File(result["h5"]) as f:  # the same scores as data, with level-0 coordinates
        np.testing.assert_array_equal(f["coords"][:], _grid())
        assert f.attrs["patch_size_level0"] == TILE and "held out" in f.attrs["models"]
        score = f["score"][:]
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["score"]) for r in rows], score, atol=1e-5)
    gj = json.loads(result["geojson"].read_text())
    assert len(gj["features"]) == len(score)


def test_predict_external_cohort(trained: Path, tmp_path: Path) -> None:
    ext = tmp_path / "external"
    ext.mkdir()
    rng = np.random.default_rng(7)
    for i in range(4):
        write_slide(ext / f"X{i}.h5", bool(i % 2), rng)
    out = tmp_path / "preds"
    assert main(["mil", "predict", "--run", str(trained), "--features", str(ext), "--out", str(out)]) == 0
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["pred"] for r in rows] == ["normal", "tumour", "normal", "tumour"]
    assert all(r["models"] == "ensemble of 3 fold model(s)" for r in rows)
    with h5py.File(out / "tile_scores" / "X1.h5") as f:
        assert f["coords"].shape == (len(_grid()), 2) and f["score"].shape == (len(_grid()),)
    assert main(["mil", "predict", "--run", str(trained), "--features", str(ext), "--fold", "1", "--out", str(out)]) == 0
    with open(out / "predictions.csv") as f:
        assert {r["models"] for r in csv.DictReader(f)} == {"fold 1"}
    # Another encoder's features are refused, naming the key and both values.
    other = tmp_path / "other"
    other.mkdir()
    write_slide(other / "Y0.h5", True, rng, model_name="another_encoder")
    with pytest.raises(HistofmError, match="model_name: run 'toy_encoder', file 'another_encoder'"):
        main_or_raise(["mil", "predict", "--run", str(trained), "--features", str(other), "--out", str(out)])


def main_or_raise(argv: list[str]) -> int:
    """Run the command's function directly, so its HistofmError can be matched."""
    from histofm.cli import build_parser

    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def test_run_folder_reuse_never_mixes_runs(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    feats, labels = dataset
    out = tmp_path / "run"
    base = ["mil", "train", "--features", str(feats), "--labels", str(labels), "--epochs", "1", "--set",
            "n_boot=0", "--device", "cpu", "--out", str(out)]
    assert main([*base, "--folds", "3", "--set", "hidden_dim=8", "--set", "attn_dim=4"]) == 0
    other = [*base, "--folds", "2", "--aggregator", "mean", "--set", "hidden_dim=8"]
    with pytest.raises(HistofmError, match="finished `mil train` run with other settings"):
        main_or_raise(other)  # it would replace the finished run silently
    assert main([*other, "--overwrite"]) == 0
    models, cfg = load_trained(out)
    assert len(models) == 2 and cfg["aggregator"] == "mean"
    assert sorted(p.name for p in out.glob("fold_*")) == ["fold_0", "fold_0.safetensors", "fold_1", "fold_1.safetensors"]
    assert not list(out.glob("fold_*/checkpoint.pt"))  # the engine's checkpoints go when their fold is done
    (out / "run.json").unlink()  # as a run killed before it finished leaves it
    with pytest.raises(HistofmError, match="no finished run"):
        load_trained(out)


def test_mixed_or_renamed_features_are_refused(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    feats, labels = dataset
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        extra = {"mpp": 1.0} if i == 5 else {}
        write_slide(mixed / f"S{i:02d}.h5", bool(i % 2), rng, **extra)
    argv = ["mil", "train", "--features", str(mixed), "--labels", str(labels), "--epochs", "1", "--out", str(tmp_path / "o")]
    with pytest.raises(HistofmError, match="mix mpp 0.5 .* and 1.0 \\(S05.h5\\)"):
        main_or_raise(argv)
    write_slide(mixed / "S05.h5", True, rng, slide="S17.svs")
    with pytest.raises(HistofmError, match="S05.h5 says it holds slide 'S17.svs'"):
        main_or_raise(argv)


def test_deprecated_spellings_still_work(dataset: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    feats, labels = dataset
    out = tmp_path / "old"
    assert main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--model", "mean", "--option",
                 "hidden_dim=8", "--folds", "2", "--epochs", "1", "--set", "n_boot=0", "--device", "cpu",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--model is deprecated; use --aggregator" in err and "--option is deprecated; use --set" in err
    assert json.loads((out / "config.json").read_text())["model_kwargs"] == {"hidden_dim": 8}
    assert main(["mil", "heatmap", "--features", str(feats / "S01.h5"), "--slide", str(sample_path("cmu_small_region")),
                 "--model-dir", str(out), "--out", str(out / "h.png")]) == 2
    assert "--out is a directory" in capsys.readouterr().err


def test_paint_geometry() -> None:
    coords = np.array([[0, 0], [100, 0], [0, 100]])
    heat = paint(coords, np.array([1.0, 0.5, 0.0]), 100, (200, 200), (20, 20))
    assert heat[0, 0] == 1.0 and heat[0, 15] == 0.5 and heat[15, 0] == 0.0 and np.isnan(heat[15, 15])
    assert tile_size_level0(coords, {}) == 100 and tile_size_level0(coords, {"patch_size_level0": 64}) == 64
    assert tile_size_level0(coords, {"tile_size": 224, "mpp": 0.5, "level0_mpp": 0.25}) == 448
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
        fit_idx, val_idx = validation_split(tr, labels, patients, 0.25)
        assert len(val_idx) and set(labels[val_idx]) == {0, 1}
        assert not {patients[i] for i in fit_idx} & {patients[i] for i in val_idx}
        assert sorted([*fit_idx, *val_idx]) == sorted(tr)
    with pytest.raises(HistofmError, match="Class 'normal' has slides from only 5 patient"):
        make_folds(labels, patients, 6, class_names=["normal", "tumour"])


def test_bad_input(tmp_path: Path, dataset: tuple[Path, Path], trained: Path, capsys: pytest.CaptureFixture) -> None:
    feats, labels = dataset
    assert find_features(feats, "S01.svs") == find_features(feats, "S01") == find_features(feats, "S01.h5")
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\nS00,a\n")
    with pytest.raises(HistofmError, match=r"bad.csv has no column 'slide_id' \(its header is slide, label\)"):
        read_labels_csv(bad)
    bad.write_text("slide_id,label\nS00,a\nS01,a\n")
    with pytest.raises(HistofmError, match="single label"):
        read_labels_csv(bad)
    bad.write_text("slide_id,label\nS00,a\nS99,b\n")
    assert main(["mil", "train", "--features", str(feats), "--labels", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "no features file" in capsys.readouterr().err
    assert main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--aggregator", "abmill",
                 "--out", str(tmp_path / "o")]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("features", data=np.zeros((3, D + 1), np.float32))
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    assert main(["mil", "heatmap", "--features", str(wrong), "--slide", str(sample_path("cmu_small_region")),
                 "--run", str(trained), "--out", str(tmp_path / "h")]) == 2
    assert "same encoder" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    assert main(["mil", "heatmap", "--features", str(wrong), "--slide", str(sample_path("cmu_small_region")),
                 "--run", str(trained), "--fold", "7", "--out", str(tmp_path / "h")]) == 2
    assert "has no fold 7" in capsys.readouterr().err
    other = tmp_path / "S03.h5"
    write_slide(other, True, np.random.default_rng(3), model_name="another_encoder", tile_size=256)
    assert main(["mil", "heatmap", "--features", str(other), "--slide", str(sample_path("cmu_small_region")),
                 "--run", str(trained), "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "model_name: run 'toy_encoder', file 'another_encoder'; tile_size: run 224, file 256" in err
