"""Classification metrics, and their spread over seeds with a bootstrapped confidence interval.

* balanced accuracy: the mean over classes of the recall ``TP_c / (TP_c + FN_c)``;
  insensitive to class imbalance (a constant predictor scores ``1 / C``);
* macro F1: the unweighted mean over classes of ``2 P_c R_c / (P_c + R_c)``;
* AUROC: the probability that a random positive is scored above a random negative,
  ``(R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-)`` with ``R_+`` the sum of the positives'
  mid-ranks (Mann-Whitney); for several classes the macro mean of one-vs-rest AUROCs.

Uncertainty: :func:`summarize` takes predictions from several seeds (several
trained probes, several few-shot draws) and reports mean and standard deviation
over seeds plus a percentile bootstrap interval over test samples (each resample
averages the metric over seeds), so both the training noise and the finite test
set show up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from histofm.errors import HistofmError


def _as_labels(y: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise HistofmError(f"{name} must be a 1-D array of class labels, got shape {arr.shape}.")
    return arr


def _check_pair(y_true: np.ndarray, other: np.ndarray) -> None:
    if len(y_true) != len(other):
        raise HistofmError(f"Labels and predictions differ in length ({len(y_true)} vs {len(other)}).")
    if len(y_true) == 0:
        raise HistofmError("Cannot compute a metric on zero samples.")


def balanced_accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    _check_pair(t, p)
    return float(np.mean([np.mean(p[t == c] == c) for c in np.unique(t)]))


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in ``y_true`` or ``y_pred`` (0 where undefined)."""
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    _check_pair(t, p)
    f1s = []
    for c in np.union1d(t, p):
        tp = np.sum((p == c) & (t == c))
        denom = np.sum(p == c) + np.sum(t == c)  # 2TP + FP + FN
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s))


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each run of equal values
    return ((last - counts + 1 + last) / 2.0)[inverse.reshape(-1)]


def binary_auroc(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """AUROC of ``scores`` for ``y_true in {0, 1}`` (Mann-Whitney U with mid-ranks for ties)."""
    t = _as_labels(y_true, "y_true").astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    _check_pair(t, s)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise HistofmError("AUROC needs both positive and negative samples; the test set has only one class.")
    ranks = rankdata(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y_true: Sequence[int] | np.ndarray, scores: np.ndarray, num_classes: int | None = None) -> float:
    """AUROC: binary from ``(n,)`` scores or ``(n, 2)`` probabilities, else one-vs-rest macro over classes.

    Args:
        y_true: labels in ``0..C-1``.
        scores: ``(n,)`` positive-class scores, or ``(n, C)`` per-class scores or probabilities.
        num_classes: ``C``; defaults to ``scores.shape[1]``.

    Classes absent from ``y_true`` are left out of the macro mean (their AUROC is undefined).
    """
    t = _as_labels(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        return binary_auroc(t, s)
    if s.ndim != 2:
        raise HistofmError(f"AUROC scores must be (n,) or (n, C), got shape {s.shape}.")
    C = num_classes or s.shape[1]
    if C == 2:
        return binary_auroc(t, s[:, 1])
    present = [c for c in range(C) if 0 < np.sum(t == c) < len(t)]
    if not present:
        raise HistofmError("AUROC needs at least two classes in the test labels.")
    return float(np.mean([binary_auroc(t == c, s[:, c]) for c in present]))


def classification_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, macro F1 and AUROC of class probabilities ``(n, C)``."""
    probs = np.asarray(probs, dtype=np.float64)
    t = _as_labels(y_true, "y_true")
    pred = probs.argmax(axis=1)
    out = {"balanced_accuracy": balanced_accuracy(t, pred), "macro_f1": macro_f1(t, pred)}
    try:
        out["auroc"] = auroc(t, probs)
    except HistofmError:
        out["auroc"] = float("nan")  # a one-class test set: AUROC is undefined, the others are not
    return out


@dataclass(frozen=True)
class MetricSummary:
    """A metric over several seeds: mean, standard deviation and a bootstrap interval."""

    mean: float
    sd: float
    ci_low: float
    ci_high: float
    n_seeds: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.sd:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def bootstrap_ci(
    y_true: np.ndarray,
    probs_per_seed: Sequence[np.ndarray],
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the seed-averaged ``metric(y_true, probs)`` over test samples."""
    rng = np.random.default_rng(seed)
    y_true = np.asarray(y_true)
    n = len(y_true)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            values.append(np.mean([metric(y_true[idx], p[idx]) for p in probs_per_seed]))
        except HistofmError:  # a resample with a single class has no AUROC; skip it
            continue
    if not values:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "balanced_accuracy": lambda t, p: balanced_accuracy(t, p.argmax(1)),
    "macro_f1": lambda t, p: macro_f1(t, p.argmax(1)),
    "auroc": lambda t, p: auroc(t, p),
}


def summarize(
    y_true: Sequence[int] | np.ndarray,
    probs_per_seed: Sequence[np.ndarray],
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
    interval: str = "bootstrap",
) -> dict[str, MetricSummary]:
    """Every metric of :data:`METRICS` as a :class:`MetricSummary` over the given seeds.

    Args:
        y_true: test labels ``(n,)``.
        probs_per_seed: one ``(n, C)`` probability (or score) array per seed.
        n_boot: bootstrap resamples of the test set (0 disables the interval).
        level: coverage of the interval.
        seed: seed of the resampling.
        interval: ``"bootstrap"`` (over test samples, the seed-averaged metric) or
            ``"seeds"`` (percentiles of the per-seed metric: the spread over
            few-shot episodes, where many seeds make the bootstrap slow and the
            support draw is the main source of variation).
    """
    if interval not in ("bootstrap", "seeds"):
        raise HistofmError(f"interval must be 'bootstrap' or 'seeds', got {interval!r}.")
    t = _as_labels(y_true, "y_true")
    if not probs_per_seed:
        raise HistofmError("summarize() needs predictions from at least one seed.")
    out = {}
    for name, fn in METRICS.items():
        try:
            per_seed = [fn(t, np.asarray(p)) for p in probs_per_seed]
        except HistofmError:
            out[name] = MetricSummary(float("nan"), float("nan"), float("nan"), float("nan"), len(probs_per_seed))
            continue
        if interval == "seeds":
            alpha = (1 - level) / 2
            lo, hi = float(np.quantile(per_seed, alpha)), float(np.quantile(per_seed, 1 - alpha))
        elif n_boot:
            lo, hi = bootstrap_ci(t, [np.asarray(p) for p in probs_per_seed], fn, n_boot, level, seed)
        else:
            lo, hi = float("nan"), float("nan")
        sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
        out[name] = MetricSummary(float(np.mean(per_seed)), sd, lo, hi, len(per_seed))
    return out


def concordance_index(times: Sequence[float] | np.ndarray, events: Sequence[bool] | np.ndarray,
                      risk: Sequence[float] | np.ndarray, tied_tol: float = 1e-8) -> float:
    """Harrell's C-index: the fraction of comparable pairs whose risks are ordered like their times.

    A pair ``(i, j)`` is comparable when ``i`` had an event and ``t_i < t_j``, or
    ``t_i = t_j`` and ``j`` was censored (still event-free at that time). It is
    concordant when ``risk_i > risk_j``; tied risks (within ``tied_tol``) count 1/2.
    The same conventions as ``sksurv.metrics.concordance_index_censored``.
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events, dtype=bool)
    r = np.asarray(risk, dtype=np.float64)
    if not (len(t) == len(e) == len(r)):
        raise HistofmError(f"Times, events and risks differ in length ({len(t)}, {len(e)}, {len(r)}).")
    # (n, n) masks, row i against column j: fine for the few thousand slides of a cohort.
    comparable = e[:, None] & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :]))
    n_pairs = comparable.sum()
    if n_pairs == 0:
        raise HistofmError("The C-index needs a comparable pair: an event before another slide's follow-up ends.")
    diff = r[:, None] - r[None, :]
    tied = np.abs(diff) <= tied_tol
    concordant = (diff > 0) & ~tied
    return float(((concordant & comparable).sum() + 0.5 * (tied & comparable).sum()) / n_pairs)


def bootstrap_metric(
    arrays: Sequence[np.ndarray],
    metric: Callable[..., float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(*arrays)``, resampling the rows of all arrays together.

    Resamples on which the metric is undefined (a single class, no comparable pair) are skipped.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            values.append(metric(*[a[idx] for a in arrays]))
        except HistofmError:
            continue
    if not values:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
