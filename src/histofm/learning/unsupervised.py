"""Unsupervised learning on embeddings: k-means, prototypes, and agreement with labels.

k-means (Lloyd 1982) splits ``N`` points into ``K`` clusters by alternating
*assign each point to its nearest centroid* and *move each centroid to the mean
of its points*, which never increases the inertia::

    J = sum_i min_k || x_i - mu_k ||^2

It only finds a local minimum, so the start matters: k-means++ (Arthur &
Vassilvitskii 2007, "k-means++: The Advantages of Careful Seeding", SODA)
picks the first centroid uniformly and each next one with probability
proportional to ``D(x)^2``, the squared distance to the nearest centroid chosen
so far; like scikit-learn we use the *greedy* variant that draws
``2 + log K`` candidates per step and keeps the one that lowers ``J`` most, and
restart ``n_init`` times, keeping the lowest ``J``. Everything is torch, so the
same code runs on a GPU: distances are computed in chunks as
``||x||^2 - 2 x.mu + ||mu||^2``.

Prototype discovery: the members nearest each centroid are the tiles that
best represent a tissue phenotype; showing them is how a pathologist names a
cluster.

When labels exist, clusters are compared with them by normalised mutual
information (NMI, arithmetic normalisation ``MI / ((H(U) + H(V)) / 2)``, as
scikit-learn's default) and the adjusted Rand index (ARI, Hubert & Arabie 1985:
pair-counting agreement corrected for chance, 0 for random labels, 1 for
identical partitions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from histofm.errors import HistofmError


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: ``(K, D)`` cluster centres.
        labels: ``(N,)`` index of the nearest centroid of each point.
        inertia: sum of squared distances of the points to their centroid.
        n_iter: Lloyd iterations of the kept run.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _check_points(x: torch.Tensor, k: int) -> None:
    if not torch.is_tensor(x) or x.ndim != 2:
        raise HistofmError(f"k-means needs a 2-D (N, D) tensor of points, got shape {tuple(getattr(x, 'shape', ()))}.")
    if not 1 <= k <= x.shape[0]:
        raise HistofmError(f"k must be between 1 and the number of points ({x.shape[0]}), got {k}.")
    if not torch.isfinite(x).all():
        raise HistofmError("The points contain NaN or infinite values; clean the features before clustering.")


def squared_distances(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """``(N, K)`` squared Euclidean distances, computed in chunks of rows, clamped at 0."""
    c_sq = (c * c).sum(1)  # (K,)
    out = []
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk]
        d = (xi * xi).sum(1, keepdim=True) - 2 * xi @ c.T + c_sq[None]  # (n, K)
        out.append(d.clamp_min_(0))
    return torch.cat(out)


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each point: ``(labels (N,), squared distance (N,))``."""
    d = squared_distances(x, centroids)
    dist, labels = d.min(1)
    return labels, dist


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator, n_local_trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding: ``(K, D)`` initial centroids chosen among the points."""
    _check_points(x, k)
    n = x.shape[0]
    trials = n_local_trials or 2 + int(math.log(k))
    first = int(torch.randint(0, n, (1,), generator=generator, device=generator.device))
    centres = [x[first]]
    closest = squared_distances(x, x[first : first + 1])[:, 0]  # (N,) D(x)^2
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # all points coincide with a centre: any point will do
            cand = torch.randint(0, n, (trials,), generator=generator, device=generator.device)
        else:
            cand = torch.multinomial(closest / total, trials, replacement=True, generator=generator)
        d_cand = torch.minimum(closest[None], squared_distances(x, x[cand]).T)  # (trials, N)
        best = int(d_cand.sum(1).argmin())
        closest = d_cand[best]
        centres.append(x[cand[best]])
    return torch.stack(centres)


def _lloyd(
    x: torch.Tensor, centroids: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    k = centroids.shape[0]
    labels, dist = assign(x, centroids)
    n_iter = 0
    for _ in range(max_iter):
        n_iter += 1
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (K, D)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)  # (K,)
        new = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if empty.any():  # re-seed an empty cluster at the point worst served by its centroid
            far = dist.topk(int(empty.sum())).indices
            new[empty] = x[far]
        shift = ((new - centroids) ** 2).sum()
        centroids = new
        labels, dist = assign(x, centroids)
        if shift <= tol:
            break
    return centroids, labels, float(dist.sum()), n_iter


def kmeans(
    x: torch.Tensor,
    k: int,
    n_init: int = 4,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> KMeansResult:
    """k-means with greedy k-means++ seeding and ``n_init`` restarts (the lowest inertia wins).

    Args:
        x: ``(N, D)`` points (any float dtype; computed in float32 or float64).
        k: number of clusters.
        n_init: restarts.
        max_iter: Lloyd iterations per restart.
        tol: stop when the squared centroid shift is below ``tol`` times the mean
            per-feature variance (scikit-learn's convention).
        seed: seed of the seeding draws.
        device: where to compute (default: ``x``'s device; pass ``"cuda"`` to use a GPU).

    Returns:
        A :class:`KMeansResult` on ``x``'s compute device.
    """
    _check_points(x, k)
    dev = torch.device(device) if device is not None else x.device
    x = x.to(dev, torch.float64 if x.dtype == torch.float64 else torch.float32)
    g = torch.Generator(device=dev).manual_seed(seed)
    abs_tol = tol * float(x.var(0, unbiased=False).mean()) if x.shape[0] > 1 else 0.0
    best: KMeansResult | None = None
    for _ in range(max(1, n_init)):
        c0 = kmeans_plusplus(x, k, g)
        c, labels, inertia, n_iter = _lloyd(x, c0, max_iter, abs_tol)
        if best is None or inertia < best.inertia:
            best = KMeansResult(c, labels, inertia, n_iter)
    assert best is not None
    return best


def prototypes(x: torch.Tensor, result: KMeansResult, n: int = 8) -> list[torch.Tensor]:
    """For each cluster, the indices of its ``n`` members nearest the centroid (nearest first).

    A cluster with fewer than ``n`` members returns all of them.
    """
    x = x.to(result.centroids.device, result.centroids.dtype)
    out = []
    for j in range(result.centroids.shape[0]):
        members = torch.nonzero(result.labels == j).flatten()
        d = ((x[members] - result.centroids[j]) ** 2).sum(1)
        out.append(members[d.argsort()[:n]])
    return out


def contingency(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> torch.Tensor:
    """``(R, C)`` counts of points with true class ``r`` and cluster ``c`` (labels re-indexed densely)."""
    a = torch.as_tensor(labels_true).flatten()
    b = torch.as_tensor(labels_pred).flatten().to(a.device)
    if a.shape != b.shape:
        raise HistofmError(f"Got {a.numel()} true labels but {b.numel()} cluster labels; give one of each per point.")
    _, ia = torch.unique(a, return_inverse=True)
    _, ib = torch.unique(b, return_inverse=True)
    r, c = int(ia.max()) + 1 if ia.numel() else 0, int(ib.max()) + 1 if ib.numel() else 0
    return torch.bincount(ia * c + ib, minlength=r * c).view(r, c).double()


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum()


def normalized_mutual_info(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> float:
    """NMI with arithmetic normalisation, ``MI / ((H(U) + H(V)) / 2)``; 1.0 when both are one cluster."""
    n = contingency(labels_true, labels_pred)
    total = n.sum()
    a, b = n.sum(1), n.sum(0)
    if (a.numel() == 1 and b.numel() == 1) or a.numel() == 0:
        return 1.0
    nz = n > 0
    mi = (n[nz] / total * (n[nz] * total / (a[:, None] * b[None])[nz]).log()).sum()
    h = (_entropy(a) + _entropy(b)) / 2
    return float((mi / h).clamp(0, 1)) if h > 0 else 1.0


def adjusted_rand_index(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> float:
    """ARI: ``(index - expected) / (max - expected)`` over pairs of points."""
    n = contingency(labels_true, labels_pred)
    total = n.sum()

    def pairs(v: torch.Tensor) -> torch.Tensor:
        return (v * (v - 1) / 2).sum()

    index, sa, sb = pairs(n), pairs(n.sum(1)), pairs(n.sum(0))
    expected = sa * sb / pairs(total.view(1)) if total > 1 else torch.zeros((), dtype=n.dtype)
    max_index = (sa + sb) / 2
    if max_index == expected:  # both partitions trivial (all one cluster, or all singletons)
        return 1.0
    return float((index - expected) / (max_index - expected))


def cluster_purity(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> float:
    """Fraction of points whose cluster's majority class is their class."""
    n = contingency(labels_true, labels_pred)
    return float(n.max(0).values.sum() / n.sum())
