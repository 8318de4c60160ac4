"""kNN, linear probe and SimpleShot: oracles, known cases, separable data, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from histofm import HistofmError
from histofm.eval.fewshot import fewshot_episodes, simpleshot_scores
from histofm.eval.knn import knn_predict
from histofm.eval.linear import linear_probe
from histofm.eval.metrics import balanced_accuracy


def _blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3
    y = np.repeat(np.arange(num_classes), n_per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.5), (20, 0.07), (50, 1.0)])
def test_knn_matches_sklearn_with_exponential_cosine_weights(k: int, temperature: float) -> None:
    x, y = _blobs(40, 4, 8, 2.5, seed=k)  # overlapping classes: the votes matter
    xq, _ = _blobs(15, 4, 8, 2.5, seed=100 + k)
    ours = knn_predict(x, y, xq, k=k, temperature=temperature)
    # scikit-learn's cosine distance is 1 - cos, so exp(cos / T) = exp((1 - d) / T).
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / temperature)).fit(x, y)
    np.testing.assert_allclose(ours, ref.predict_proba(xq), atol=1e-6)


def test_knn_known_case_and_separable_data() -> None:
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    probs = knn_predict(train, np.array([0, 1, 1]), np.array([[1.0, 0.1]]), k=2, temperature=1.0)
    cos = np.array([1.0, 0.8 + 0.06]) / np.hypot(1.0, 0.1)  # neighbours: [1, 0] (class 0) and [.8, .6] (class 1)
    w = np.exp(cos)
    np.testing.assert_allclose(probs[0], w / w.sum(), atol=1e-6)
    x, y = _blobs(30, 3, 16, 0.3, seed=0)
    xq, yq = _blobs(10, 3, 16, 0.3, seed=0)
    assert balanced_accuracy(yq, knn_predict(x, y, xq).argmax(1)) == 1.0
    assert knn_predict(x[::30], y[::30], xq, k=20).shape == (30, 3)  # k larger than the training set is clamped


def test_linear_probe_sweep_and_separable_data() -> None:
    x, y = _blobs(60, 3, 10, 1.0, seed=1)
    xq, yq = _blobs(20, 3, 10, 1.0, seed=1)
    res = linear_probe(x, y, xq, seed=0)
    assert balanced_accuracy(yq, res.probs.argmax(1)) == 1.0
    assert set(res.val_scores) == {1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0} and res.C in res.val_scores
    np.testing.assert_allclose(res.probs.sum(1), 1.0)
    fixed = linear_probe(x, y, xq, C=0.5)
    assert fixed.C == 0.5 and fixed.val_scores == {}
    # Standardisation makes the probe blind to per-feature scale.
    scale = np.linspace(0.01, 100, 10)
    np.testing.assert_allclose(linear_probe(x * scale, y, xq * scale, C=0.5).probs, fixed.probs, atol=1e-4)


def test_linear_probe_learns_beyond_chance_on_noisy_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 20))
    y = (x[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(int)
    res = linear_probe(x[:300], y[:300], x[300:])
    assert balanced_accuracy(y[300:], res.probs.argmax(1)) > 0.8


def test_simpleshot_known_case_and_centring() -> None:
    support = np.array([[2.0, 0.0], [0.0, 2.0]])
    scores = simpleshot_scores(support, np.array([0, 1]), np.array([[3.0, 0.1], [0.1, 5.0]]), 2, mean=np.zeros(2))
    assert scores.argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(-scores[0, 0], np.linalg.norm(np.array([3.0, 0.1]) / np.hypot(3, 0.1) - [1, 0]))
    x, y = _blobs(30, 4, 12, 0.5, seed=3)
    xq, yq = _blobs(10, 4, 12, 0.5, seed=3)
    episodes = fewshot_episodes(x, y, xq, shots=1, episodes=10, seed=0)
    assert len(episodes) == 10 and all(balanced_accuracy(yq, e.argmax(1)) == 1.0 for e in episodes)
    # Centring on the pool mean removes a common offset: features + 1000 give the same episodes.
    shifted = fewshot_episodes(x + 1000, y, xq + 1000, shots=3, episodes=5, seed=1)
    np.testing.assert_allclose(shifted, fewshot_episodes(x, y, xq, shots=3, episodes=5, seed=1), atol=1e-6)


def test_bad_protocol_input() -> None:
    x, y = _blobs(5, 2, 4, 1.0, seed=0)
    with pytest.raises(HistofmError, match="differ in size"):
        knn_predict(x, y, np.zeros((2, 3)))
    with pytest.raises(HistofmError, match="k >= 1"):
        knn_predict(x, y, x, k=0)
    with pytest.raises(HistofmError, match="two classes"):
        linear_probe(x, np.zeros(10, int), x)
    with pytest.raises(HistofmError, match="fewer than 10 shots"):
        fewshot_episodes(x, y, x, shots=10)
    with pytest.raises(HistofmError, match="labels"):
        knn_predict(x, y[:3], x)
