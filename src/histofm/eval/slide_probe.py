"""Linear probe on slide embeddings: cross-validated logistic regression per slide.

A slide encoder (Prov-GigaPath, TITAN) turns each slide into one vector; the standard way to
judge those vectors is a linear probe: L2-regularised logistic regression
(:func:`histofm.eval.linear.linear_probe`, ``C`` chosen on a validation split of each
training fold), evaluated by K-fold cross-validation whose folds are stratified by label and
grouped by patient (the folds of ``histofm mil``, so the two are comparable). Every slide is
predicted once, by the probe that did not see it; metrics (balanced accuracy, macro F1,
AUROC) are computed per fold and on the pooled out-of-fold predictions, with a bootstrap
interval over slides.

:func:`probe_slide_embeddings` is the entry point behind
``histofm mil train --slide-embeddings DIR --labels CSV`` (labels CSV: ``slide_id,label[,patient_id]``).
It writes ``predictions.csv`` (``slide_id, patient_id, fold, label, pred, prob_<class>...``)
and ``metrics.json`` into ``out_dir``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histofm.errors import HistofmError
from histofm.eval.linear import DEFAULT_CS, linear_probe
from histofm.eval.metrics import MetricSummary, classification_metrics, summarize
from histofm.utils import atomic_path


@dataclass(frozen=True)
class SlideProbeResult:
    """Out-of-fold predictions and metrics of a cross-validated slide probe."""

    slide_ids: list[str]
    patients: list[str]
    labels: np.ndarray  # (S,) class indices
    class_names: list[str]
    folds: np.ndarray  # (S,) the fold in which each slide was tested
    probs: np.ndarray  # (S, C) out-of-fold probabilities
    fold_metrics: list[dict[str, float]]
    chosen_C: list[float]
    pooled: dict[str, MetricSummary] = field(default_factory=dict)

    def metrics_dict(self) -> dict[str, object]:
        """What ``metrics.json`` holds."""
        per_fold = {k: [m[k] for m in self.fold_metrics] for k in self.fold_metrics[0]}
        return {
            "folds": len(self.fold_metrics),
            "n_slides": len(self.slide_ids),
            "classes": self.class_names,
            "fold_mean": {k: float(np.nanmean(v)) for k, v in per_fold.items()},
            "fold_sd": {k: float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in per_fold.items()},
            "per_fold": per_fold,
            "pooled": {k: vars(v) for k, v in self.pooled.items()},
            "chosen_C": self.chosen_C,
        }


def slide_probe_cv(
    embeddings: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    patients: Sequence[str] | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
    n_boot: int = 500,
    slide_ids: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> SlideProbeResult:
    """Cross-validate a logistic-regression probe on ``embeddings (S, D)`` with integer ``labels (S,)``.

    Args:
        embeddings: one row per slide.
        labels: class index per slide.
        patients: patient per slide (folds never split a patient); default one patient per slide.
        folds: number of folds.
        seed: fold assignment and validation splits.
        Cs: inverse regularisation strengths searched inside each training fold.
        n_boot: bootstrap resamples for the pooled intervals (0: none).
        slide_ids, class_names: carried into the result.
    """
    from histofm.mil.cv import make_folds

    X = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if X.ndim != 2 or len(X) != len(y):
        raise HistofmError(f"The slide probe needs (S, D) embeddings and S labels, got {X.shape} and {y.shape}.")
    ids = list(slide_ids) if slide_ids is not None else [str(i) for i in range(len(y))]
    pats = list(patients) if patients is not None else ids
    n_classes = int(y.max()) + 1
    probs = np.zeros((len(y), n_classes))
    fold_of = np.full(len(y), -1)
    fold_metrics, chosen = [], []
    for k, (train, test) in enumerate(make_folds(y, pats, folds, seed)):
        res = linear_probe(X[train], y[train], X[test], Cs=Cs, seed=seed + k)
        p = np.zeros((len(test), n_classes))
        p[:, : res.probs.shape[1]] = res.probs
        probs[test], fold_of[test] = p, k
        fold_metrics.append(classification_metrics(y[test], p))
        chosen.append(res.C)
    pooled = summarize(y, [probs], n_boot=n_boot, seed=seed)
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    return SlideProbeResult(ids, pats, y, names, fold_of, probs, fold_metrics, chosen, pooled)


def probe_slide_embeddings(
    embeddings_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 500,
) -> SlideProbeResult:
    """Probe the slide embeddings of a ``slide_embeddings_<encoder>`` folder against a labels CSV.

    Slides of the CSV without an embedding are an error (it names them); embeddings without a
    label are ignored. With ``out_dir``, writes ``predictions.csv`` and ``metrics.json``.
    """
    from histofm.mil.data import read_labels_csv
    from histofm.wsi.slide_embed import read_slide_embeddings

    names, X, _ = read_slide_embeddings(embeddings_dir)
    table = read_labels_csv(labels_csv)
    row = {n: i for i, n in enumerate(names)}
    missing = [s for s in table.slide_ids if s not in row]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise HistofmError(
            f"{len(missing)} labelled slides have no embedding in {embeddings_dir} ({shown}); "
            "run `histofm slide-embed` on their features or drop them from the labels CSV."
        )
    emb = X[[row[s] for s in table.slide_ids]]
    result = slide_probe_cv(
        emb, table.labels, table.patients, folds=folds, seed=seed, n_boot=n_boot,
        slide_ids=table.slide_ids, class_names=table.class_names,
    )
    if out_dir is not None:
        write_probe_outputs(result, out_dir)
    return result


def write_probe_outputs(result: SlideProbeResult, out_dir: str | os.PathLike[str]) -> None:
    """``predictions.csv`` and ``metrics.json`` in ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "patient_id", "fold", "label", "pred", *[f"prob_{c}" for c in result.class_names]])
        for i, sid in enumerate(result.slide_ids):
            w.writerow([sid, result.patients[i], int(result.folds[i]), result.class_names[result.labels[i]],
                        result.class_names[int(result.probs[i].argmax())], *[f"{p:.6f}" for p in result.probs[i]]])
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result.metrics_dict(), indent=2, default=float) + "\n")
