"""Survival: the C-index against scikit-survival and lifelines, the losses against oracles, and learning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histofm import HistofmError
from histofm.cli import main
from histofm.eval.metrics import concordance_index
from histofm.mil.survival import cox_loss, discretize, nll_loss, risk_from_logits, time_bins


@pytest.mark.parametrize("seed", range(6))
def test_c_index_matches_scikit_survival_with_ties_and_censoring(seed: int) -> None:
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(seed)
    n = 40
    times = rng.integers(1, 12, n).astype(float)  # few distinct times: many tied times
    events = rng.random(n) < 0.6  # about 40% censored
    events[0] = True
    risk = rng.integers(0, 6, n).astype(float) if seed % 2 else rng.normal(size=n)  # tied risks on odd seeds
    expected = concordance_index_censored(events, times, risk)[0]
    assert concordance_index(times, events, risk) == pytest.approx(expected, abs=1e-12)


def test_c_index_matches_lifelines_without_tied_times() -> None:
    from lifelines.utils import concordance_index as lifelines_ci

    rng = np.random.default_rng(0)
    times = rng.permutation(50).astype(float) + 1.0
    events = rng.random(50) < 0.7
    risk = np.round(rng.normal(size=50), 1)  # tied risks
    # lifelines scores survival time (higher = longer), so it takes minus the risk.
    assert concordance_index(times, events, risk) == pytest.approx(lifelines_ci(times, -risk, events), abs=1e-12)
    assert concordance_index(times, events, -times) == 1.0  # risk ordered exactly like the times
    with pytest.raises(HistofmError, match="comparable pair"):
        concordance_index(times[:3], np.zeros(3, bool), risk[:3])


def test_cox_loss_matches_lifelines_partial_likelihood() -> None:
    import pandas as pd
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(1)
    n = 60
    x = rng.normal(size=n)
    times = rng.exponential(np.exp(-0.8 * x)) + np.arange(n) * 1e-6  # distinct times: Breslow = Efron
    events = rng.random(n) < 0.75
    cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "T": times, "E": events}), "T", "E")
    beta = float(cph.params_["x"])
    ours = cox_loss(torch.tensor(beta * x), torch.tensor(times), torch.tensor(events))
    assert float(ours) * events.sum() == pytest.approx(-cph.log_likelihood_, rel=1e-6)


def test_nll_loss_matches_the_equation() -> None:
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(size=(7, 4)))
    bins = torch.tensor([0, 1, 2, 3, 1, 0, 3])
    events = torch.tensor([1, 0, 1, 0, 1, 0, 1])
    h = 1 / (1 + np.exp(-logits.numpy()))
    expected = []
    for i in range(7):
        y = int(bins[i])
        s_before = np.prod(1 - h[i, :y])  # survived bins 0..y-1
        if events[i]:
            expected.append(-np.log(s_before * h[i, y]))
        else:
            expected.append(-np.log(s_before * (1 - h[i, y])))
    assert float(nll_loss(logits, bins, events)) == pytest.approx(np.mean(expected), rel=1e-6)
    edges = time_bins(np.array([1.0, 2, 3, 4, 5, 9]), np.array([1, 1, 1, 1, 0, 1], bool), 4)
    np.testing.assert_allclose(edges, np.quantile([1.0, 2, 3, 4, 9], [0.25, 0.5, 0.75]))
    assert discretize(np.array([0.5, 2.0, 100.0]), edges).tolist() == [0, 1, 3]
    r = risk_from_logits(torch.tensor([[5.0, 5.0], [-5.0, -5.0]]), "nll")
    assert r[0] > r[1]  # high hazards = high risk


def _cohort(root: Path, n: int = 40) -> Path:
    """Bags whose share of planted tiles shortens survival: risk is readable from the tiles."""
    rng = np.random.default_rng(0)
    feats = root / "features"
    feats.mkdir()
    rows = []
    for i in range(n):
        k = int(rng.integers(0, 10))  # planted tiles of 30
        x = rng.normal(size=(30, 8)).astype(np.float32)
        x[:k, 0] += 3.0
        with h5py.File(feats / f"S{i:02d}.h5", "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=np.stack([np.arange(30) * 256, np.zeros(30)], 1).astype(np.int64))
            f.attrs["model_name"] = "toy"
        t = float(np.exp(2.5 - 0.25 * k + 0.15 * rng.normal()))
        rows.append([f"S{i:02d}", f"{t:.4f}", int(rng.random() < 0.8), f"P{i:02d}"])
    labels = root / "os.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "months", "dead", "patient_id"], *rows])
    return labels


@pytest.mark.parametrize("loss", ["nll", "cox"])
def test_survival_training_learns(loss: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    labels = _cohort(tmp_path)
    out = tmp_path / loss
    assert main(["mil", "train", "--features", str(tmp_path / "features"), "--labels", str(labels), "--task", "survival",
                 "--time-col", "months", "--event-col", "dead", "--aggregator", "mean", "--set", "hidden_dim=16",
                 "--set", f"loss={loss}", "--set", "val_fraction=0", "--set", "n_boot=100",
                 "--folds", "2", "--epochs", "30", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    t = np.array([float(r["time"]) for r in rows])
    e = np.array([r["event"] == "1" for r in rows])
    r = np.array([float(r["risk"]) for r in rows])
    assert metrics["pooled"]["c_index"] == pytest.approx(concordance_index(t, e, r), abs=1e-6)
    assert metrics["mean"]["c_index"] > 0.72, metrics  # random risk: 0.5 (measured: nll 0.81, cox 0.84)
    lo, hi = metrics["pooled"]["c_index_ci"]
    assert lo <= metrics["pooled"]["c_index"] <= hi
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["out_dim"] == (4 if loss == "nll" else 1) and cfg["task"] == "survival"
    pred = tmp_path / f"pred_{loss}"
    assert main(["mil", "predict", "--run", str(out), "--features", str(tmp_path / "features"), "--out", str(pred)]) == 0
    with open(pred / "predictions.csv") as f:  # training slides: each scored by its held-out model, as in CV
        again = {row["slide_id"]: float(row["risk"]) for row in csv.DictReader(f)}
    np.testing.assert_allclose([again[row["slide_id"]] for row in rows], r, atol=1e-5)


def test_survival_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    labels = _cohort(tmp_path, n=6)
    base = ["mil", "train", "--features", str(tmp_path / "features"), "--labels", str(labels), "--task", "survival",
            "--out", str(tmp_path / "o")]
    assert main(base) == 2
    assert "--time-col, --event-col" in capsys.readouterr().err
    assert main([*base, "--time-col", "months", "--event-col", "dead", "--set", "loss=cox"]) == 2
    assert "--batch-size 2 or more" in capsys.readouterr().err
    assert main([*base, "--time-col", "months", "--event-col", "dead", "--set", "loss=mse"]) == 2
    assert "--set loss='mse' is not valid; loss must be one of nll, cox." in capsys.readouterr().err
