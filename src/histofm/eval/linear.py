"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

    min_W,b  sum_i w_{y_i} CE(softmax(W x_i + b), y_i) + ||W||^2 / (2 C)

Features are standardised with the training mean and standard deviation. The
inverse regularisation strength ``C`` is chosen on a stratified validation split
of the TRAINING set (balanced accuracy), over a log grid, and the probe is then
refitted on the whole training set: the test set never picks a hyper-parameter.
``class_weight="balanced"`` weighs classes by inverse frequency (``w_c = n / (C n_c)``).
Solved with scikit-learn's L-BFGS (deterministic: the seed only changes the
validation split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histofm.errors import HistofmError
from histofm.eval.metrics import balanced_accuracy

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))


@dataclass(frozen=True)
class LinearProbeResult:
    """Test probabilities ``(m, C)``, the chosen ``C`` and the validation score of every ``C`` tried."""

    probs: np.ndarray
    C: float
    val_scores: dict[float, float]


def _fit(x: np.ndarray, y: np.ndarray, C: float, class_weight: str | None, max_iter: int) -> object:
    import contextlib
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter)
    # A probe on a few thousand samples is dominated by BLAS thread synchronisation,
    # not arithmetic: one thread was 10-50x faster on 2 busy cores (686 x 384 features).
    small = x.shape[0] * x.shape[1] <= 4_000_000
    with warnings.catch_warnings(), (threadpool_limits(1, user_api="blas") if small else contextlib.nullcontext()):
        warnings.simplefilter("ignore", ConvergenceWarning)  # weak regularisation on separable data: fine for a probe
        return clf.fit(x, y)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-8, std, 1.0)  # constant features stay constant instead of exploding
    return [(a - mean) / std for a in (train, *others)]


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    Cs: Sequence[float] | None = DEFAULT_CS,
    C: float | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    class_weight: str | None = "balanced",
    standardize: bool = True,
    max_iter: int = 1000,
) -> LinearProbeResult:
    """Fit a logistic-regression probe on ``train`` and return its test probabilities.

    Args:
        train_x, train_y: ``(n, d)`` features and ``(n,)`` labels.
        test_x: ``(m, d)`` features.
        Cs: grid of ``C`` values searched on the validation split.
        C: a fixed ``C`` (skips the search).
        val_fraction: share of the training set held out for the search.
        seed: seed of the validation split.
        class_weight: ``"balanced"`` or ``None``.
        standardize: standardise features with training statistics.
        max_iter: L-BFGS iterations.
    """
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y = np.asarray(train_y)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise HistofmError(f"Linear probe needs (n, d) train and test features of one size, got {train_x.shape} and {test_x.shape}.")
    if len(train_x) != len(train_y):
        raise HistofmError(f"{len(train_x)} training features but {len(train_y)} labels.")
    if len(np.unique(train_y)) < 2:
        raise HistofmError("The linear probe needs at least two classes in the training labels.")
    if standardize:
        train_x, test_x = _standardise(train_x, test_x)
    val_scores: dict[float, float] = {}
    if C is None:
        if not Cs:
            raise HistofmError("Give a fixed C or a non-empty grid Cs for the linear probe.")
        from sklearn.model_selection import train_test_split

        counts = np.bincount(train_y)
        stratify = train_y if counts[counts > 0].min() >= 2 else None
        tr, va = train_test_split(np.arange(len(train_y)), test_size=val_fraction, random_state=seed, stratify=stratify)
        for c in Cs:
            clf = _fit(train_x[tr], train_y[tr], c, class_weight, max_iter)
            val_scores[float(c)] = balanced_accuracy(train_y[va], clf.predict(train_x[va]))  # type: ignore[attr-defined]
        C = max(val_scores, key=lambda c: (val_scores[c], -c))  # ties: the stronger regularisation
    clf = _fit(train_x, train_y, C, class_weight, max_iter)
    probs = np.zeros((len(test_x), int(train_y.max()) + 1))
    probs[:, clf.classes_] = clf.predict_proba(test_x)  # type: ignore[attr-defined]
    return LinearProbeResult(probs=probs, C=float(C), val_scores=val_scores)
