"""Patient-grouped cross-validation of a slide-level model, with a validation split inside each fold.

:func:`cross_validate` splits the slides into folds stratified by label (by event
for survival) and grouped by patient (scikit-learn's ``StratifiedGroupKFold``), so
no patient has slides on both sides of a split. Inside each fold's training part a
further stratified, patient-grouped split holds out ``val_fraction`` of the
patients for early stopping. It writes, atomically, into ``out_dir``:

* ``progress.json`` and ``fold_K.state.pt`` while it runs, so a killed run resumes
  (both removed when it finishes);
* ``fold_K.safetensors``: each fold's model (the best validation epoch);
* ``log.jsonl``: one record per fold and epoch (training and validation loss);
* ``predictions.csv``: every slide once, scored by the fold model that held it out;
* ``metrics.json``: per fold and pooled out-of-fold, each metric with a 95% bootstrap
  interval over slides, and the mean +/- sd over folds;
* ``config.json``: aggregator, options, classes, settings, the features' provenance,
  written only when every fold is done;
* ``run.json``: the manifest of this run's models, written last (see :mod:`histofm.mil.run`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict
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
from histofm.mil.base import build_aggregator
from histofm.mil.data import SlideTable
from histofm.mil.run import (
    abandon_run,
    begin_run,
    finish_run,
    fold_done,
    load_state,
    save_state,
    save_weights,
    sha256,
)
from histofm.mil.survival import check_loss, discretize, risk_from_logits, survival_curve, time_bins
from histofm.mil.train import MILTrainConfig, Targets, fit, predict_logits, subset
from histofm.utils import atomic_path, seed_everything

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


def _fold_targets(table: SlideTable, config: MILTrainConfig, tr: np.ndarray) -> tuple[Targets, np.ndarray | None]:
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


def cross_validate(
    bags: Sequence[torch.Tensor],
    table: SlideTable,
    config: MILTrainConfig,
    folds: int,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = False,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train and test one model per fold; write models, log, predictions, metrics and the manifest.

    A folder holding an unfinished run with the same settings and data is resumed: finished
    folds are kept, the current fold continues from its last epoch (see :mod:`histofm.mil.run`);
    the result is bit-identical to an uninterrupted run. Other settings are refused unless
    ``overwrite``.

    Returns:
        ``{"folds": [per-fold metrics], "pooled": {...}, "mean": {...}, "sd": {...}}``.

    Raises:
        HistofmError: on non-finite losses or predictions; then no metrics are written and the
            unfinished run is forgotten.
    """
    out = Path(out_dir)
    survival = table.task == "survival"
    if survival:
        check_loss(config.loss, config.batch_size)
    in_dim = int(getattr(bags, "dim", 0) or bags[0].shape[1])
    out_dim = output_dim(table, config)
    splits = make_folds(table.labels, table.patients, folds, config.seed,
                        None if survival else table.class_names)
    run_config = {
        "aggregator": config.model, "model_kwargs": config.model_kwargs, "in_dim": in_dim, "out_dim": out_dim,
        "task": table.task, "class_names": table.class_names, "folds": folds, "train": asdict(config),
        "provenance": provenance or {}, "data_sha256": data_fingerprint(table, bags),
    }
    run_id, done = begin_run(out, run_config, overwrite=overwrite)
    try:
        return _run_folds(bags, table, config, splits, out, run_id, run_config, done, in_dim, out_dim, device, progress)
    except HistofmError:
        abandon_run(out)  # a deterministic failure (NaN) would only repeat on resume
        raise


def _run_folds(
    bags: Sequence[torch.Tensor], table: SlideTable, config: MILTrainConfig,
    splits: list[tuple[np.ndarray, np.ndarray]], out: Path, run_id: str, run_config: dict[str, Any],
    done: list[dict[str, Any]], in_dim: int, out_dim: int, device: str | torch.device, progress: bool,
) -> dict[str, Any]:
    survival = table.task == "survival"
    done_by_fold = {int(d["fold"]): d for d in done
                    if (out / d["file"]).is_file() and sha256(out / d["file"]) == d.get("sha256")}
    log_lines: list[str] = []

    def write_log() -> None:
        with atomic_path(out / "log.jsonl") as tmp:
            tmp.write_text("".join(line + "\n" for line in log_lines))

    keys = SURVIVAL_METRICS if survival else CLASSIFICATION_METRICS
    fold_metrics, rows, fold_docs = [], [], []
    oof_index, oof_probs, oof_risk = [], [], []
    for k, (tr, te) in enumerate(splits):
        seed_everything(config.seed + k)
        target, edges = _fold_targets(table, config, tr)
        fit_idx, val_idx = validation_split(tr, table.labels, table.patients, config.val_fraction, config.seed + k)
        name = f"fold_{k}.safetensors"
        if k in done_by_fold:  # finished before a kill: its logits and log records were kept
            logits = np.asarray(done_by_fold[k]["logits"], dtype=np.float64).reshape(len(te), out_dim)
            log_lines.extend(json.dumps(r) for r in done_by_fold[k]["log"])
        else:
            model = build_aggregator(config.model, in_dim, out_dim, **config.model_kwargs)
            state = load_state(out, k)
            fold_log = [] if state is None else [{"fold": k, **r} for r in state["records"]]
            log_lines.extend(json.dumps(r) for r in fold_log)

            def log(record: dict[str, Any], k: int = k, fold_log: list[dict[str, Any]] = fold_log) -> None:
                fold_log.append({"fold": k, **record})
                log_lines.append(json.dumps(fold_log[-1]))
                write_log()

            fit(model, subset(bags, fit_idx), target[fit_idx], config, device, progress,
                val_bags=subset(bags, val_idx), val_labels=target[val_idx], log=log, state=state,
                save_state=lambda st, k=k: save_state(out, k, st))
            logits, _ = predict_logits(model, subset(bags, te), device, scores=False)
            if not np.isfinite(logits).all():
                raise HistofmError(
                    f"The fold {k} model of {config.model} gives NaN or infinite outputs on its test slides "
                    f"(e.g. {table.slide_ids[te[int(np.argwhere(~np.isfinite(logits))[0, 0])]]!r}); "
                    f"lower --lr (now {config.lr:g}) and train again."
                )
            save_weights(out / name, model.state_dict())
            fold_done(out, {"fold": k, "file": name, "logits": logits.tolist(), "log": fold_log})
        write_log()
        if survival:
            assert table.times is not None and table.events is not None
            risk = risk_from_logits(torch.from_numpy(logits), config.loss).numpy()
            m = survival_summary(table.times[te], table.events[te], risk, config.n_boot, config.seed)
            oof_risk.append(risk)
            curves = survival_curve(torch.from_numpy(logits)).numpy() if config.loss == "nll" else None
            for j, i in enumerate(te):
                extra = [] if curves is None else [f"{v:.6f}" for v in curves[j]]
                rows.append([table.slide_ids[i], table.patients[i], k, f"{table.times[i]:g}",
                             int(table.events[i]), f"{risk[j]:.6f}", *extra])
        else:
            probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
            m = classification_summary(table.labels[te], probs, config.n_boot, config.seed)
            oof_probs.append(probs)
            for j, i in enumerate(te):
                rows.append([table.slide_ids[i], table.patients[i], k, table.class_names[table.labels[i]],
                             table.class_names[int(probs[j].argmax())], *[f"{p:.6f}" for p in probs[j]]])
        oof_index.append(te)
        m.update(fold=k, n_train=len(fit_idx), n_val=len(val_idx), n_test=len(te))
        fold_metrics.append(m)
        fold_docs.append({"fold": k, "file": name, "test_slides": [table.slide_ids[i] for i in te],
                          "bin_edges": None if edges is None else [float(e) for e in edges]})
    header = ["slide_id", "patient_id", "fold"]
    if survival:
        header += ["time", "event", "risk"] + ([f"surv_bin{b}" for b in range(out_dim)] if config.loss == "nll" else [])
    else:
        header += ["label", "pred", *[f"prob_{c}" for c in table.class_names]]
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    idx = np.concatenate(oof_index)
    if survival:
        assert table.times is not None and table.events is not None
        # Pooling risks of different fold models assumes they share a scale; the per-fold values do not.
        pooled = survival_summary(table.times[idx], table.events[idx], np.concatenate(oof_risk), config.n_boot, config.seed)
    else:
        pooled = classification_summary(table.labels[idx], np.concatenate(oof_probs), config.n_boot, config.seed)
    summary = {
        "folds": fold_metrics,
        "pooled": pooled,
        "mean": {key: float(np.nanmean([m[key] for m in fold_metrics])) for key in keys},
        "sd": {key: float(np.nanstd([m[key] for m in fold_metrics], ddof=1)) for key in keys},
        "interval": f"95% percentile bootstrap over slides, {config.n_boot} resamples",
    }
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    finish_run(out, run_id, run_config, fold_docs)
    return summary
