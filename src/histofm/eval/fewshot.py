"""Few-shot classification with SimpleShot (Wang et al. 2019, arXiv 1911.04623).

Features are centred and L2-normalised ("CL2N"), each class is represented by the
mean of its ``k`` support features (its prototype), and a query goes to the
nearest prototype in Euclidean distance::

    x~ = (x - mu) / ||x - mu||,     p_c = 1/k sum_{i in S_c} x~_i,     y^ = argmin_c ||x~ - p_c||

``mu`` is the mean of the labelled pool the supports are drawn from (the training
set; ``center="support"`` uses the support set of the episode instead). Results
vary with the drawn supports, so many episodes are run and reported as a mean
with a spread. The returned per-class scores are ``-||x~ - p_c||`` (usable for AUROC).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from histofm.errors import HistofmError


def simpleshot_scores(
    support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray, num_classes: int, mean: np.ndarray
) -> np.ndarray:
    """Per-class scores ``-||x~ - p_c||`` of the queries, ``(m, C)`` (``-inf`` for classes without support)."""

    def cl2n(a: np.ndarray) -> np.ndarray:
        a = a - mean
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    s, q = cl2n(support_x), cl2n(query_x)
    protos = np.full((num_classes, s.shape[1]), np.nan)
    for c in range(num_classes):
        if np.any(support_y == c):
            protos[c] = s[support_y == c].mean(0)
    d = np.sqrt(np.maximum(((q[:, None, :] - protos[None]) ** 2).sum(-1), 0))  # (m, C)
    return np.where(np.isnan(d), -np.inf, -d)


def fewshot_episodes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    shots: int = 10,
    episodes: int = 100,
    seed: int = 0,
    center: Literal["train", "support"] = "train",
) -> list[np.ndarray]:
    """Run ``episodes`` SimpleShot episodes with ``shots`` supports per class drawn from the training set.

    Returns:
        One ``(m, C)`` score array over the whole test set per episode.
    """
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y = np.asarray(train_y)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise HistofmError(f"Few-shot needs (n, d) train and test features of one size, got {train_x.shape} and {test_x.shape}.")
    if shots < 1 or episodes < 1:
        raise HistofmError(f"Few-shot needs shots >= 1 and episodes >= 1, got {shots} and {episodes}.")
    C = int(train_y.max()) + 1
    by_class = [np.flatnonzero(train_y == c) for c in range(C)]
    small = [c for c in range(C) if len(by_class[c]) < shots]
    if small:
        raise HistofmError(
            f"Class {small[0]} has {len(by_class[small[0]])} training samples, fewer than {shots} shots; lower --shots."
        )
    rng = np.random.default_rng(seed)
    pool_mean = train_x.mean(0)
    out = []
    for _ in range(episodes):
        idx = np.concatenate([rng.choice(ix, shots, replace=False) for ix in by_class])
        mean = pool_mean if center == "train" else train_x[idx].mean(0)
        out.append(simpleshot_scores(train_x[idx], train_y[idx], test_x, C, mean))
    return out
