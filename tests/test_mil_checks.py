"""Bad input to `histofm mil` ends in one sentence before any work; damaged runs and NaN never pass (issue 16)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from histofm.cli import main
from histofm.data import sample_path
from histofm.errors import HistofmError
from histofm.mil import build_aggregator, list_aggregators
from histofm.mil.base import _AGGREGATORS
from histofm.mil.data import read_bag, read_labels_csv
from histofm.mil.options import AGGREGATOR_OPTIONS
from mil_toy import D, make_cohort, write_slide

SMALL = ["--set", "hidden_dim=4", "--set", "attn_dim=4", "--set", "n_boot=0", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def run(cohort: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    feats, labels = cohort
    out = tmp_path_factory.mktemp("run") / "abmil"
    assert main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--folds", "2", "--epochs", "2",
                 *SMALL, "--out", str(out)]) == 0
    return out


def _error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("histofm: error: "), err
    return err[0]


def _train(cohort: tuple[Path, Path], out: Path, *extra: str, labels: Path | None = None) -> int:
    feats, lab = cohort
    return main(["mil", "train", "--features", str(feats), "--labels", str(labels or lab), "--folds", "2",
                 "--epochs", "1", *SMALL, "--out", str(out), *extra])


BAD_TRAIN = [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--weight-decay", "nan"], "--weight-decay"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"), (["--max-tiles", "-1"], "--max-tiles"),
    (["--max-tiles", "0"], "--max-tiles"), (["--folds", "1"], "--folds"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--set", "hidden_dim=0"], "hidden_dim"),
    (["--set", "dropout=1"], "dropout"), (["--set", "dropout=nan"], "dropout"), (["--set", "gated=maybe"], "gated"),
    (["--set", "k_sample=3"], "k_sample is not an option of abmil"), (["--set", "n_boot=-1"], "n_boot"),
    (["--set", "val_fraction=0.9"], "val_fraction"), (["--set", "lr=inf"], "lr"), (["--set", "hidden_dim=2.5"], "hidden_dim"),
    (["--aggregator", "transmil", "--set", "dim=6", "--set", "num_heads=4"], "num_heads"),
    (["--aggregator", "moe", "--set", "expert=moe"], "expert"), (["--device", "tpu9"], "--device"),
    (["--device", "cuda:99"], "--device"), (["--resume", "--overwrite"], "--overwrite"),
]


@pytest.mark.parametrize("extra,needle", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_flags_fail_before_any_work(cohort, tmp_path, capsys, extra, needle) -> None:
    out = tmp_path / "out"
    assert _train(cohort, out, *extra) == 2
    assert needle in _error(capsys)
    assert not out.exists()  # refused before a file was written


def test_bad_out_folders(cohort, tmp_path, capsys, run) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for out, needle in ((a_file, "is an existing file"), (a_file / "sub", "lies under the file"),
                        (Path("/sys/histofm_out"), "cannot be written")):
        assert _train(cohort, out) == 2
        assert needle in _error(capsys)
    assert a_file.read_text() == "mine"
    feats, _ = cohort
    assert main(["mil", "predict", "--run", str(run), "--features", str(feats), "--out", str(a_file)]) == 2
    assert "is an existing file" in _error(capsys)
    assert main(["mil", "predict", "--run", str(run), "--features", str(feats), "--out", str(run)]) == 2
    assert "is the --run folder" in _error(capsys)


def test_every_aggregator_option_is_declared() -> None:
    names = list_aggregators()
    assert set(AGGREGATOR_OPTIONS) == set(names)
    for name in names:
        cls = _AGGREGATORS[name]
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "in_dim", "num_classes")]
        if params == ["kwargs"]:  # abmil_plain forwards to abmil
            params = list(AGGREGATOR_OPTIONS["abmil"])
        assert set(params) == set(AGGREGATOR_OPTIONS[name]), name


def test_labels_csv_encodings_and_blank_labels(tmp_path: Path, cohort, capsys) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_text("slide_id,label\nA,x\nB,y\n", encoding="utf-8")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    a, b = read_labels_csv(bom), read_labels_csv(plain)
    assert a.slide_ids == b.slide_ids == ["A", "B"] and a.class_names == b.class_names == ["x", "y"]
    blank = tmp_path / "blank.csv"
    blank.write_text("slide_id,label\nA,x\nB,\nC,y\n")
    with pytest.raises(HistofmError, match="blank.csv row 3 has no value for 'label'"):
        read_labels_csv(blank)
    short = tmp_path / "short.csv"
    short.write_text("slide_id,label\nA,x\nB\n")
    with pytest.raises(HistofmError, match="short.csv row 3 has no value for 'label'"):
        read_labels_csv(short)
    for name, data in (("binary.csv", bytes(range(256)) * 4), ("latin1.csv", "slide_id,label\nA,caf\xe9\n".encode("latin-1"))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(HistofmError, match="not (a )?UTF-8"):  # the one CSV reader, histofm.tables
            read_labels_csv(tmp_path / name)
    assert _train(cohort, tmp_path / "o", labels=tmp_path / "binary.csv") == 2
    assert "--labels" in _error(capsys)


def test_nan_features_are_refused_naming_the_slide(tmp_path: Path, capsys) -> None:
    feats, labels = make_cohort(tmp_path, seed=1)
    bad = np.ones((9, D), np.float32)
    bad[4, 1] = np.nan
    write_slide(feats / "S05.h5", True, np.random.default_rng(0), feats=bad)
    with pytest.raises(HistofmError, match="S05.h5 holds NaN or infinite features in 1 tile"):
        read_bag(feats / "S05.h5")
    out = tmp_path / "o"
    assert main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--folds", "2", "--epochs", "1",
                 *SMALL, "--out", str(out)]) == 2
    assert "S05.h5 holds NaN" in _error(capsys)
    assert not (out / "metrics.json").exists() and not (out / "config.json").exists()


def test_diverging_training_is_an_error(tmp_path: Path, capsys) -> None:
    feats, labels = make_cohort(tmp_path, seed=2)
    huge = np.full((9, D), 3e38, np.float32)  # finite, but the first layer overflows: the loss is NaN
    write_slide(feats / "S03.h5", True, np.random.default_rng(0), feats=huge)
    out = tmp_path / "o"
    assert main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--folds", "2", "--epochs", "1",
                 "--set", "n_boot=0", "--device", "cpu", "--out", str(out)]) == 2  # 256 hidden units: one overflows
    # The engine skips each step whose loss is not finite (with a warning); the fold that tests S03
    # (or validates on it) then meets its NaN and ends the run in one sentence naming the slide.
    assert re.search(r"model of abmil gives NaN or infinite outputs on its test slides \(e\.g\. 'S03'\)|"
                     r"validation loss of abmil became nan", _error(capsys))
    assert not (out / "metrics.json").exists() and not (out / "config.json").exists()
    assert not (out / "progress.json").exists()  # forgotten: a rerun with another --lr starts afresh
    write_slide(feats / "S03.h5", True, np.random.default_rng(0))
    assert _train((feats, labels), out, "--lr", "1e-3") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(np.isfinite(metrics["pooled"][k]) for k in ("balanced_accuracy", "auroc"))


def test_outputs_share_one_permission(run: Path) -> None:
    modes = {str(f.relative_to(run)): stat.S_IMODE(f.stat().st_mode) for f in run.rglob("*") if f.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert {"fold_0.safetensors", "fold_1.safetensors", "config.json", "run.json"} <= set(modes)
    assert {"fold_0/log.jsonl", "fold_0/loss_curve.png", "fold_0/aggregator.safetensors"} <= set(modes)
    assert not [n for n in modes if n.endswith(("checkpoint.pt", ".tmp")) or n == "progress.json"]


def _damage(run: Path, tmp: Path, how: str) -> Path:
    d = tmp / how
    shutil.copytree(run, d)
    manifest = json.loads((d / "run.json").read_text())
    cfg = json.loads((d / "config.json").read_text())

    def rehash() -> None:
        from histofm.mil.run import sha256

        manifest["folds"][0]["sha256"] = sha256(d / "fold_0.safetensors")
        (d / "run.json").write_text(json.dumps(manifest))

    if how == "no-manifest":
        (d / "run.json").unlink()
    elif how == "corrupt-manifest":
        (d / "run.json").write_bytes(b"\x00\xff{garbage")
    elif how == "corrupt-config":
        (d / "config.json").write_text('{"aggregator": ')
    elif how == "edited-config":
        (d / "config.json").write_text(json.dumps({**cfg, "in_dim": "four"}))
    elif how == "truncated-model":
        data = (d / "fold_0.safetensors").read_bytes()
        (d / "fold_0.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "truncated-model-rehashed":
        data = (d / "fold_0.safetensors").read_bytes()
        (d / "fold_0.safetensors").write_bytes(data[: len(data) // 2])
        rehash()
    elif how == "wrong-shapes":
        save_file(build_aggregator("abmil", D, 2, hidden_dim=7, attn_dim=3).state_dict(), d / "fold_0.safetensors")
        rehash()
    elif how == "other-aggregator":
        save_file(build_aggregator("mean", D, 2, hidden_dim=4).state_dict(), d / "fold_0.safetensors")
        rehash()
    elif how == "nan-weights":
        sd = build_aggregator("abmil", D, 2, hidden_dim=4, attn_dim=4).state_dict()
        save_file({k: torch.full_like(v, float("nan")) for k, v in sd.items()}, d / "fold_0.safetensors")
        rehash()
    elif how == "path-in-manifest":
        manifest["folds"][0]["file"] = "../../etc/passwd"
        (d / "run.json").write_text(json.dumps(manifest))
    return d


DAMAGE = ["no-manifest", "corrupt-manifest", "corrupt-config", "edited-config", "truncated-model",
          "truncated-model-rehashed", "wrong-shapes", "other-aggregator", "nan-weights", "path-in-manifest"]


def test_damaged_run_folders_end_in_one_sentence(run: Path, cohort, tmp_path: Path, capsys) -> None:
    feats, _ = cohort
    for how in DAMAGE:
        d = _damage(run, tmp_path, how)
        assert main(["mil", "predict", "--run", str(d), "--features", str(feats / "S01.h5"),
                     "--out", str(tmp_path / f"p-{how}")]) == 2, how
        assert "train again" in _error(capsys) or how == "no-manifest"
        assert main(["mil", "heatmap", "--run", str(d), "--features", str(feats / "S01.h5"),
                     "--slide", str(sample_path("cmu_small_region")), "--out", str(tmp_path / f"h-{how}")]) == 2
        _error(capsys)
        assert not (tmp_path / f"p-{how}").exists() and not (tmp_path / f"h-{how}").exists()


def test_heatmap_flags(run: Path, cohort, tmp_path: Path, capsys) -> None:
    feats, _ = cohort
    base = ["mil", "heatmap", "--run", str(run), "--features", str(feats / "S01.h5"),
            "--slide", str(sample_path("cmu_small_region"))]
    for extra, needle in ((["--size", "0"], "--size"), (["--alpha", "nan"], "--alpha")):
        assert main([*base, *extra, "--out", str(tmp_path / "h")]) == 2
        assert needle in _error(capsys)
    assert main([*base, "--size", "64", "--out", str(tmp_path / "h")]) == 0
    with h5py.File(tmp_path / "h" / "S01_scores.h5") as f:
        assert np.isfinite(f["score"][:]).all()
