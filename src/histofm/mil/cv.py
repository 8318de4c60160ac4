"""Patient-grouped cross-validation of a slide-level model: folds, a validation split, summaries.

:func:`make_folds` splits the slides into folds stratified by label (by event for
survival) and grouped by patient (scikit-learn's ``StratifiedGroupKFold``), so no
patient has slides on both sides of a split. Inside each fold's training part
:func:`validation_split` holds out ``val_fraction`` of the patients (again stratified
and grouped) for early stopping. :func:`summarise_fold` scores a fold's test slides and
:func:`write_results` writes ``predictions.csv`` and ``metrics.json`` (each metric with a
95% bootstrap interval over slides, per fold and pooled out-of-fold, and the mean +/- sd
over folds).

The loop over folds trains through the engine, so it lives a floor up, in
:func:`histofm.train.mil.cross_validate`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofm.errors import HistofmError
from histofm.eval.metrics import (
    METRICS,
    bootstrap_ci,
    bootstrap_metric,
    classification_metrics,
    concordance_index,
)
from histofm.mil.data import SlideTable
from histofm.mil.survival import discretize, risk_from_logits, survival_curve, time_bins
from histofm.mil.train import MILTrainConfig, Targets
from histofm.utils import atomic_path

CLASSIFICATION_METRICS = ("balanced_accuracy", "macro_f1", "auroc")
SURVIVAL_METRICS = ("c_index",)


def make_folds(
    labels: np.ndarray, groups: Sequence[str], folds: int, seed: int = 0, class_names: Sequence[str] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_idx, test_idx)`` pairs, stratified by label and grouped by patient."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups_arr = np.asarray(groups)
    if folds < 2:
        raise HistofmError(f"Cross-validation needs at least 2 folds, got {folds}; raise --folds.")
    for c in np.unique(labels):
        n_pat = len(np.unique(groups_arr[labels == c]))
        if n_pat < folds:
            name = class_names[int(c)] if class_names else str(int(c))
            raise HistofmError(
                f"Class {name!r} has slides from only {n_pat} patient(s), fewer than the {folds} folds; "
                "lower --folds or add slides."
            )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(labels)), labels, groups_arr)]


def validation_split(
    train_idx: np.ndarray, strata: np.ndarray, groups: Sequence[str], fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``train_idx`` into (fit, validation), stratified and patient-grouped.

    Returns an empty validation part when ``fraction`` is 0 or the fold has too few
    patients per class for a grouped split (then the fold trains for all epochs).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    empty = np.array([], dtype=np.int64)
    if fraction <= 0:
        return train_idx, empty
    n_splits = max(2, int(round(1 / fraction)))
    s, g = strata[train_idx], np.asarray(groups)[train_idx]
    if any(len(np.unique(g[s == c])) < 2 for c in np.unique(s)) or len(np.unique(g)) < n_splits:
        return train_idx, empty
    if (np.unique(s, return_counts=True)[1] < n_splits).all():  # scikit-learn refuses such a split
        return train_idx, empty
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits"
        warnings.simplefilter("ignore", UserWarning)
        fit_part, val_part = next(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(
            np.zeros(len(train_idx)), s, g))
    if len(np.unique(s[fit_part])) < len(np.unique(s)):
        return train_idx, empty
    return train_idx[fit_part], train_idx[val_part]


def _with_interval(values: dict[str, float], arrays: list[np.ndarray], fns: dict[str, Any], n_boot: int,
                   seed: int) -> dict[str, Any]:
    out: dict[str, Any] = dict(values)
    for key, fn in fns.items():
        out[f"{key}_ci"] = list(bootstrap_metric(arrays, fn, n_boot, seed=seed)) if n_boot else [None, None]
    return out


def classification_summary(y: np.ndarray, probs: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Balanced accuracy, macro F1 and AUROC, each with a bootstrap interval ``<key>_ci``."""
    out: dict[str, Any] = classification_metrics(y, probs)
    for key in CLASSIFICATION_METRICS:  # AUROC raises on a one-class resample: bootstrap_ci skips it
        out[f"{key}_ci"] = list(bootstrap_ci(y, [probs], METRICS[key], n_boot, seed=seed)) if n_boot else [None, None]
    return out


def survival_summary(times: np.ndarray, events: np.ndarray, risk: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Harrell's C-index of the risk scores, with a bootstrap interval ``c_index_ci``."""
    try:
        c = concordance_index(times, events, risk)
    except HistofmError:
        c = float("nan")
    return _with_interval({"c_index": c}, [times, events, risk], {"c_index": concordance_index}, n_boot, seed)


def fold_targets(table: SlideTable, config: MILTrainConfig, tr: np.ndarray) -> tuple[Targets, np.ndarray | None]:
    """Targets of every slide for fold training part ``tr`` and (survival NLL) the time-bin edges drawn from it."""
    if table.task == "classification":
        return Targets.classes(table.labels), None
    assert table.times is not None and table.events is not None
    edges = time_bins(table.times[tr], table.events[tr], config.n_bins) if config.loss == "nll" else None
    bins = discretize(table.times, edges) if edges is not None else None
    return Targets.survival(table.times, table.events, bins), edges


def output_dim(table: SlideTable, config: MILTrainConfig) -> int:
    if table.task == "classification":
        return len(table.class_names)
    return config.n_bins if config.loss == "nll" else 1


def data_fingerprint(table: SlideTable, bags: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the labels table and the features files' names and sizes: a resumed run must see the same data."""
    h = hashlib.sha256()
    h.update(json.dumps([table.slide_ids, table.labels.tolist(), table.patients, table.class_names,
                         None if table.times is None else table.times.tolist(),
                         None if table.events is None else table.events.tolist()]).encode())
    for p in getattr(bags, "paths", []):
        h.update(f"{Path(p).name}:{Path(p).stat().st_size}".encode())
    return h.hexdigest()


def summarise_fold(table: SlideTable, config: MILTrainConfig, k: int, te: np.ndarray, logits: np.ndarray,
                   *, n_train: int, n_val: int) -> dict[str, Any]:
    """Metrics of fold ``k`` on its test slides ``te`` from its logits ``(len(te), C)``, with the CSV rows.

    Returns:
        ``{"metrics": {...}, "rows": [...], "index": te, "scores": probabilities or risks}``.
    """
    rows = []
    if table.task == "survival":
        assert table.times is not None and table.events is not None
        risk = risk_from_logits(torch.from_numpy(logits), config.loss).numpy()
        m = survival_summary(table.times[te], table.events[te], risk, config.n_boot, config.seed)
        curves = survival_curve(torch.from_numpy(logits)).numpy() if config.loss == "nll" else None
        for j, i in enumerate(te):
            extra = [] if curves is None else [f"{v:.6f}" for v in curves[j]]
            rows.append([table.slide_ids[i], table.patients[i], k, f"{table.times[i]:g}",
                         int(table.events[i]), f"{risk[j]:.6f}", *extra])
        scores = risk
    else:
        probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
        m = classification_summary(table.labels[te], probs, config.n_boot, config.seed)
        for j, i in enumerate(te):
            rows.append([table.slide_ids[i], table.patients[i], k, table.class_names[table.labels[i]],
                         table.class_names[int(probs[j].argmax())], *[f"{p:.6f}" for p in probs[j]]])
        scores = probs
    m.update(fold=k, n_train=n_train, n_val=n_val, n_test=len(te))
    return {"metrics": m, "rows": rows, "index": te, "scores": scores}


def write_results(out: Path, table: SlideTable, config: MILTrainConfig, folds: list[dict[str, Any]],
                  out_dim: int) -> dict[str, Any]:
    """Write ``predictions.csv`` and ``metrics.json`` from the folds' :func:`summarise_fold` results; returns the summary."""
    survival = table.task == "survival"
    keys = SURVIVAL_METRICS if survival else CLASSIFICATION_METRICS
    header = ["slide_id", "patient_id", "fold"]
    if survival:
        header += ["time", "event", "risk"] + ([f"surv_bin{b}" for b in range(out_dim)] if config.loss == "nll" else [])
    else:
        header += ["label", "pred", *[f"prob_{c}" for c in table.class_names]]
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([row for fold in folds for row in fold["rows"]])
    idx = np.concatenate([fold["index"] for fold in folds])
    scores = np.concatenate([fold["scores"] for fold in folds])
    if survival:
        assert table.times is not None and table.events is not None
        # Pooling risks of different fold models assumes they share a scale; the per-fold values do not.
        pooled = survival_summary(table.times[idx], table.events[idx], scores, config.n_boot, config.seed)
    else:
        pooled = classification_summary(table.labels[idx], scores, config.n_boot, config.seed)
    fold_metrics = [fold["metrics"] for fold in folds]
    summary = {
        "folds": fold_metrics,
        "pooled": pooled,
        "mean": {key: float(np.nanmean([m[key] for m in fold_metrics])) for key in keys},
        "sd": {key: float(np.nanstd([m[key] for m in fold_metrics], ddof=1)) for key in keys},
        "interval": f"95% percentile bootstrap over slides, {config.n_boot} resamples",
    }
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary
