"""Metrics against scikit-learn, and the seed/bootstrap summaries."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from histofm import HistofmError
from histofm.eval.metrics import (
    auroc,
    balanced_accuracy,
    binary_auroc,
    bootstrap_ci,
    classification_metrics,
    macro_f1,
    summarize,
)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_metrics_match_sklearn(seed: int, num_classes: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, num_classes, n)
    y[:num_classes] = np.arange(num_classes)  # every class present
    probs = rng.dirichlet(np.ones(num_classes), n)
    probs = np.round(probs, 1) + 1e-9 * rng.random(probs.shape) * (seed % 2)  # ties for even seeds
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    assert balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert macro_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    if num_classes == 2:
        expected = skm.roc_auc_score(y, probs[:, 1])
    else:
        expected = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert auroc(y, probs) == pytest.approx(expected, abs=1e-10)


def test_binary_auroc_with_ties_and_known_values() -> None:
    assert binary_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert binary_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert binary_auroc([1, 1, 0], [3, 2, 1]) == 1.0
    y, s = [0, 1, 1, 0, 1, 0, 1], [1, 2, 2, 2, 3, 0, 1]
    assert binary_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))


def test_macro_f1_counts_never_predicted_classes() -> None:
    y, pred = np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1])
    assert macro_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert balanced_accuracy(y, pred) == pytest.approx((1 + 1 + 0) / 3)


def test_summaries_over_seeds() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    perfect = np.eye(3)[y]
    s = summarize(y, [perfect, perfect], n_boot=200)
    assert s["balanced_accuracy"].mean == 1.0 and s["balanced_accuracy"].ci_low == 1.0 and s["auroc"].sd == 0.0
    noisy = [np.eye(3)[np.where(rng.random(len(y)) < 0.3, rng.integers(0, 3, len(y)), y)] for _ in range(5)]
    s = summarize(y, noisy, n_boot=300)
    per_seed = [balanced_accuracy(y, p.argmax(1)) for p in noisy]
    bal = s["balanced_accuracy"]
    assert bal.mean == pytest.approx(np.mean(per_seed)) and bal.sd == pytest.approx(np.std(per_seed, ddof=1))
    assert bal.ci_low < bal.mean < bal.ci_high and bal.n_seeds == 5
    spread = summarize(y, noisy, interval="seeds")["balanced_accuracy"]
    assert spread.ci_low == pytest.approx(np.quantile(per_seed, 0.025))
    lo, hi = bootstrap_ci(y, noisy[:1], lambda t, p: balanced_accuracy(t, p.argmax(1)), n_boot=300)
    assert lo < per_seed[0] < hi and hi - lo < 0.25


def test_bad_metric_input() -> None:
    with pytest.raises(HistofmError, match="differ in length"):
        balanced_accuracy([0, 1], [0])
    with pytest.raises(HistofmError, match="only one class"):
        binary_auroc([1, 1], [0.2, 0.3])
    with pytest.raises(HistofmError, match="1-D"):
        macro_f1(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(HistofmError, match="zero samples"):
        balanced_accuracy([], [])
    assert np.isnan(classification_metrics([1, 1], np.array([[0.2, 0.8], [0.4, 0.6]]))["auroc"])
