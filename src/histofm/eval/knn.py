"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018, arXiv 1805.01978; DINO's protocol).

Features are L2-normalised; each test sample takes its ``k`` most similar training
samples and each neighbour votes for its class with weight ``exp(s / T)``::

    score_c(x) = sum_{j in top-k(x)} exp(cos(x, x_j) / T) [y_j = c],    p(c | x) = score_c / sum_c' score_c'

``k = 20`` and ``T = 0.07`` are the usual defaults (DINO, and the numbers in
the project's baselines). No training, no hyper-parameters fitted on the test set.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histofm.errors import HistofmError


def _check(train_x: np.ndarray | torch.Tensor, train_y: np.ndarray | torch.Tensor, test_x: np.ndarray | torch.Tensor) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2:
        raise HistofmError(f"Features must be 2-D (n, d), got {tuple(train_x.shape)} and {tuple(test_x.shape)}.")
    if train_x.shape[1] != test_x.shape[1]:
        raise HistofmError(f"Train and test features differ in size ({train_x.shape[1]} vs {test_x.shape[1]}).")
    if len(train_x) != len(train_y):
        raise HistofmError(f"{len(train_x)} training features but {len(train_y)} labels.")
    if len(train_x) == 0 or len(test_x) == 0:
        raise HistofmError("kNN needs at least one training and one test sample.")


@torch.no_grad()
def knn_predict(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Class probabilities ``(n_test, C)`` from temperature-weighted cosine kNN votes.

    Args:
        train_x: ``(n, d)`` training features.
        train_y: ``(n,)`` labels in ``0..C-1``.
        test_x: ``(m, d)`` test features.
        k: neighbours (clamped to the training-set size).
        temperature: ``T`` in ``exp(cos / T)``.
        num_classes: ``C`` (default: ``max(train_y) + 1``).
        chunk: test samples per similarity block (bounds memory).
    """
    _check(train_x, train_y, test_x)
    if k < 1 or temperature <= 0:
        raise HistofmError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}.")
    xtr = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    xte = F.normalize(torch.as_tensor(np.asarray(test_x), dtype=torch.float32), dim=1)
    ytr = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    C = num_classes or int(ytr.max()) + 1
    k = min(k, len(xtr))
    out = []
    for s in range(0, len(xte), chunk):
        sims, idx = (xte[s : s + chunk] @ xtr.T).topk(k, dim=1)  # (b, k)
        # Subtracting the row maximum keeps exp() finite; it cancels in the normalisation.
        w = torch.exp((sims - sims[:, :1]) / temperature)  # (b, k)
        scores = torch.zeros(len(sims), C).scatter_add_(1, ytr[idx], w)  # (b, C)
        out.append(scores / scores.sum(1, keepdim=True))
    return torch.cat(out).double().numpy()
