"""Property-based fuzz of `histofm mil train|predict|heatmap` over their flags and every aggregator's --set keys.

Hypothesis draws each flag and each declared ``--set`` key (:mod:`histofm.mil.options`) from a
pool of valid values and a pool of invalid ones (out of range, NaN, inf, wrong type, unknown
key, missing or damaged paths). Every command runs in-process and must:

* never raise (no traceback): it returns 0, or 2 with one ``histofm: error:`` sentence
  (argparse's own usage errors exit 2 too);
* fail (non-zero) whenever a value from an invalid pool was drawn;
* on exit 0, write only finite numbers (metrics, probabilities, tile scores);
* create or remove no file outside ``--out``.

CI runs a bounded number of examples (``HISTOFM_FUZZ_EXAMPLES`` raises it for a longer run).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import itertools
import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histofm.cli import main
from histofm.data import sample_path
from histofm.mil import list_aggregators
from histofm.mil.options import AGGREGATOR_OPTIONS, TRAIN_OPTIONS, Option
from mil_toy import D, make_cohort, write_slide

COUNTER = itertools.count()  # a fresh --out for every example (hypothesis repeats drawn values)
OUTCOMES: collections.Counter = collections.Counter()  # (command, drawn, exit code) -> examples
EXAMPLES = int(os.environ.get("HISTOFM_FUZZ_EXAMPLES", "0"))
FUZZ = settings(deadline=None, derandomize=EXAMPLES == 0, database=None,
                suppress_health_check=list(HealthCheck))


def _n(ci: int) -> int:
    return EXAMPLES or ci


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuzz")
    feats, labels = make_cohort(root / "data")
    surv = root / "data" / "survival.csv"
    with open(surv, "w", newline="") as f:
        rows = [[f"S{i:02d}", f"P{i:02d}", 5 + 3 * i, int(i % 3 != 0)] for i in range(12)]
        csv.writer(f).writerows([["slide_id", "patient_id", "time", "event"], *rows])
    nan_dir = root / "data" / "nan"
    nan_dir.mkdir()
    bad = np.zeros((9, D), np.float32)
    bad[0, 0] = np.inf
    write_slide(nan_dir / "S00.h5", False, np.random.default_rng(0), feats=bad)
    (root / "data" / "not_h5.h5").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (root / "data" / "a_file").write_text("user data")
    (root / "outs").mkdir()
    run = root / "data" / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["mil", "train", "--features", str(feats), "--labels", str(labels), "--folds", "2", "--epochs",
                     "1", "--set", "hidden_dim=4", "--set", "attn_dim=4", "--set", "n_boot=0", "--device", "cpu",
                     "--out", str(run)]) == 0
    return {"root": root, "feats": feats, "labels": labels, "surv": surv, "nan": nan_dir, "run": run,
            "not_h5": root / "data" / "not_h5.h5", "file": root / "data" / "a_file", "outs": root / "outs"}


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if p == skip or skip in p.parents:
            continue
        s = p.lstat()
        out[str(p)] = (0, 0) if p.is_dir() else (s.st_size, s.st_mtime_ns)  # a folder's mtime moves with --out
    return out


def _call(argv: list[str], world: dict[str, Path], out: Path) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stderr). Any exception fails the test (a traceback)."""
    before = _tree(world["root"], out)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage error, exit 2
            rc = int(e.code or 0)
    assert _tree(world["root"], out) == before, "a file outside --out was created, changed or removed"
    text = err.getvalue()
    assert "Traceback" not in text
    if rc != 0:
        lines = [ln for ln in text.splitlines() if "error:" in ln]
        assert rc == 2 and len(lines) == 1, text
    return rc, text


# ------------------------------------------------------------------------------------------- values
BAD_NUMBERS = ["nan", "inf", "-inf", "NaN", "Infinity", "x", "", "[1,2]", "{}", "1e999", "true"]


def _option_value(opt: Option, valid: bool) -> st.SearchStrategy[str]:
    """A valid or an invalid value of one declared option; valid ones are kept small so examples stay fast."""
    if opt.kind == "bool":
        good = st.sampled_from(["true", "false"])
        bad = st.sampled_from(["maybe", "2", "nan", "[]"])
    elif opt.kind == "choice":
        good = st.sampled_from([json.dumps(c) if not isinstance(c, str) else c for c in opt.choices])
        bad = st.sampled_from(["nope", "3.5", "-1", "null"] if not opt.optional else ["nope", "3.5"])
    elif opt.kind in ("int_list", "dict"):
        good = st.just("null")
        bad = st.sampled_from(["[0]", "[-4]", "3", "x"] if opt.kind == "int_list" else ["3", "[1]", "x"])
    elif opt.kind == "int":
        lo = int(opt.low if opt.low is not None else 0)
        hi = int(min(opt.high if opt.high is not None else lo + 6, lo + 6))
        good = st.integers(lo, hi).map(str)
        out_of_range = [str(lo - 1)] + ([str(int(opt.high) + 1)] if opt.high is not None else [])
        bad = st.sampled_from([*out_of_range, "2.5", *BAD_NUMBERS])
    else:
        lo = float(opt.low if opt.low is not None else 0.0)
        hi = float(opt.high) if opt.high is not None else lo + 1.0
        good = st.floats(lo, min(hi, lo + 1.0), exclude_min=opt.low_open, exclude_max=opt.high_open).map(repr)
        out_of_range = [repr(lo - 0.5)] + ([repr(hi + 0.5)] if opt.high is not None else [])
        bad = st.sampled_from([*out_of_range, *BAD_NUMBERS])
    return good if valid else bad


def _flag(good: list[str | None], bad: list[str]) -> st.SearchStrategy[tuple[str | None, bool]]:
    """``(value, valid)``, valid two times in three (so some examples get past every check)."""
    valid = st.sampled_from(good).map(lambda v: (v, True))
    return st.one_of(valid, valid, st.sampled_from(bad).map(lambda v: (v, False)))


FLAG_VALUES: dict[str, tuple[list[str | None], list[str]]] = {  # flag -> (valid values, invalid values)
    "--lr": (["1e-3", "0.05", "2"], ["0", "-1", "nan", "inf", "-inf", "1e300", "x"]),
    "--weight-decay": (["0", "1e-4", "0.5"], ["-1", "nan", "inf", "x"]),
    "--seed": (["0", "7", str(2**31)], ["-1", str(2**32), str(2**64), "1.5"]),
    "--max-tiles": ([None, "3", "1", "100"], ["0", "-1", "x"]),
    "--folds": (["2", "3"], ["1", "0", "-2", "x"]),
    "--epochs": (["1", "2"], ["0", "-3", "x"]),
    "--batch-size": (["1", "3", "50"], ["0", "-1", "x"]),
    "--device": ([None, "cpu"], ["cuda:9", "tpu", "", "cpu:x"]),
}


@st.composite
def train_case(draw: st.DrawFn) -> tuple[list[str], bool, str]:
    """One ``mil train`` command line; at most one value is drawn from an invalid pool (so each is seen alone)."""
    corrupt = draw(st.sampled_from([None, None, None, None, "aggregator", "set", "unknown", *FLAG_VALUES]))
    names = list_aggregators()
    aggregator = draw(st.sampled_from(["abmill", "MOE", "", "mean "] if corrupt == "aggregator" else names))
    spec = {**AGGREGATOR_OPTIONS.get(aggregator, {}), **{k: v for k, v in TRAIN_OPTIONS.items()
                                                          if k not in ("epochs", "lr", "batch_size")}}
    keys = draw(st.lists(st.sampled_from(sorted(spec)), min_size=1 if corrupt == "set" else 0, max_size=4, unique=True))
    bad_key = draw(st.sampled_from(keys)) if corrupt == "set" else None
    sets: dict[str, str] = {"n_boot": "0"}
    for key in keys:
        sets[key] = draw(_option_value(spec[key], key != bad_key))
    if corrupt == "unknown":
        sets[draw(st.sampled_from(["bogus", "hidden-dim", "", " "]))] = "1"
    argv: list[str] = []
    for flag in FLAG_VALUES:
        good, bad = FLAG_VALUES[flag]
        value = draw(st.sampled_from(bad if flag == corrupt else good))
        if value is not None:
            argv += [flag, value]
    task = draw(st.sampled_from(["classification", "survival"]))
    return [*argv, "--aggregator", aggregator, "--task", task,
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]], corrupt is None, task


def _finite_outputs(out: Path) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    for key, value in metrics["pooled"].items():
        if not key.endswith("_ci"):
            assert math.isfinite(value), (key, value)
    with open(out / "predictions.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k.startswith(("prob_", "risk", "surv_")):
                    assert math.isfinite(float(v)), (k, v)


@settings(FUZZ, max_examples=_n(30))
@given(case=train_case())
def test_fuzz_mil_train(world: dict[str, Path], case: tuple[list[str], bool, str]) -> None:
    args, valid, task = case
    out = world["outs"] / f"train{next(COUNTER)}"
    labels = world["surv"] if task == "survival" else world["labels"]
    rc, err = _call(["mil", "train", "--features", str(world["feats"]), "--labels", str(labels), *args,
                     "--out", str(out)], world, out)
    OUTCOMES["train", "invalid" if not valid else "valid", rc] += 1
    if not valid:
        assert rc != 0, f"invalid input accepted: {args}"
    if rc == 0:
        _finite_outputs(out)
        assert (out / "run.json").is_file() and not (out / "progress.json").exists()
    else:
        assert not (out / "metrics.json").exists() and not (out / "run.json").exists()


def _path_choice(world: dict[str, Path], name: str) -> st.SearchStrategy[tuple[Path, bool]]:
    options = {
        "features": [("feats", True), ("one", True)] * 3 + [("nan", False), ("missing", False), ("not_h5", False)],
        "out": [("new", True)] * 4 + [("file", False), ("under_file", False), ("run", False)],
    }[name]
    return st.sampled_from(options).map(lambda o: (_resolve(world, o[0]), o[1]))


def _resolve(world: dict[str, Path], key: str) -> Path:
    return {"feats": world["feats"], "one": world["feats"] / "S01.h5", "nan": world["nan"],
            "missing": world["root"] / "nowhere", "not_h5": world["not_h5"], "file": world["file"],
            "under_file": world["file"] / "sub", "run": world["run"], "new": Path("NEW")}[key]


@settings(FUZZ, max_examples=_n(15))
@given(features=st.data(), fold=_flag(["all", "0", "1"], ["5", "-1", "x", ""]))
def test_fuzz_mil_predict(world: dict[str, Path], features: st.DataObject, fold: tuple[str, bool]) -> None:
    feats, ok_f = features.draw(_path_choice(world, "features"))
    out, ok_o = features.draw(_path_choice(world, "out"))
    out = world["outs"] / f"predict{next(COUNTER)}" if out == Path("NEW") else out
    rc, _ = _call(["mil", "predict", "--run", str(world["run"]), "--features", str(feats), "--fold", fold[0],
                   "--out", str(out)], world, out if ok_o else world["outs"] / "never")
    OUTCOMES["predict", "valid" if ok_f and ok_o and fold[1] else "invalid", rc] += 1
    if not (ok_f and ok_o and fold[1]):
        assert rc != 0
    if rc == 0:
        with open(out / "predictions.csv") as f:
            for row in csv.DictReader(f):
                assert all(math.isfinite(float(v)) for k, v in row.items() if k.startswith("prob_"))


@settings(FUZZ, max_examples=_n(8))
@given(features=st.data(), size=_flag(["64", "100"], ["0", "-5", "20000", "x"]),
       alpha=_flag(["0", "0.5", "1"], ["nan", "2", "-0.1"]),
       kind=st.sampled_from(["tile", "detection", "annotation"]))
def test_fuzz_mil_heatmap(world: dict[str, Path], features: st.DataObject, size: tuple[str, bool],
                          alpha: tuple[str, bool], kind: str) -> None:
    feats, ok_f = features.draw(st.sampled_from([(world["feats"] / "S01.h5", True)] * 3 + [(world["nan"] / "S00.h5", False),
                                                 (world["not_h5"], False), (world["root"] / "nope.h5", False)]))
    out, ok_o = features.draw(_path_choice(world, "out"))
    out = world["outs"] / f"heat{next(COUNTER)}" if out == Path("NEW") else out
    rc, _ = _call(["mil", "heatmap", "--run", str(world["run"]), "--features", str(feats), "--slide",
                   str(sample_path("cmu_small_region")), "--size", size[0], "--alpha", alpha[0], "--object-type", kind,
                   "--out", str(out)], world, out if ok_o else world["outs"] / "never")
    OUTCOMES["heatmap", "valid" if ok_f and ok_o and size[1] and alpha[1] else "invalid", rc] += 1
    if not (ok_f and ok_o and size[1] and alpha[1]):
        assert rc != 0
    if rc == 0:
        with h5py.File(out / "S01_scores.h5") as f:
            assert np.isfinite(f["score"][:]).all()


def test_fuzz_summary() -> None:
    """Prints the outcome counts (run with ``-s``; the longer run's counts are in the closing note)."""
    for key, count in sorted(OUTCOMES.items()):
        print("fuzz", *key, count)
    assert not [k for k in OUTCOMES if k[1] == "invalid" and k[2] == 0]
