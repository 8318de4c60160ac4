"""k-means (against scikit-learn), k-means++ seeding, prototypes, NMI/ARI (against sklearn.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from threadpoolctl import threadpool_limits

from histofm import HistofmError
from histofm.learning.unsupervised import (
    adjusted_rand_index,
    cluster_purity,
    kmeans,
    kmeans_plusplus,
    normalized_mutual_info,
    prototypes,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # These problems are small: thread start-up and contention on a shared CI box cost more than they win.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("n,k,d,std", [(600, 4, 5, 1.0), (900, 8, 16, 3.0)])
def test_kmeans_inertia_matches_sklearn(n: int, k: int, d: int, std: float) -> None:
    x, _ = make_blobs(n, n_features=d, centers=k, cluster_std=std, random_state=k)
    ours = kmeans(torch.tensor(x, dtype=torch.float64), k, n_init=4, seed=0)
    ref = KMeans(k, n_init=4, random_state=0).fit(x)
    # Same objective, independently recomputed from our labels and centroids.
    c = ours.centroids.numpy()
    lab = ours.labels.numpy()
    assert ours.inertia == pytest.approx(((x - c[lab]) ** 2).sum(), rel=1e-9)
    assert np.array_equal(lab, ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1))  # every point at its nearest centroid
    assert ours.inertia <= ref.inertia_ * (1 + 1e-3)
    assert adjusted_rand_index(torch.tensor(ref.labels_), ours.labels) > 0.95


@pytest.mark.parametrize("n,k,d,std,dtype", [(500, 5, 2, 2.5, torch.float64), (1500, 12, 10, 4.0, torch.float32)])
def test_kmeans_on_overlapping_blobs_as_good_as_sklearn(n: int, k: int, d: int, std: float, dtype: torch.dtype) -> None:
    # Overlapping clusters have many local minima, so single runs differ by luck: compare the
    # seeding + Lloyd quality over 12 seeds (mean and best), one start each.
    x, _ = make_blobs(n, n_features=d, centers=k, cluster_std=std, random_state=k)
    ours = [kmeans(torch.tensor(x, dtype=dtype), k, n_init=1, seed=s) for s in range(12)]
    ref = [KMeans(k, n_init=1, random_state=s).fit(x).inertia_ for s in range(12)]
    assert ours[0].centroids.dtype == dtype
    inertia = np.array([r.inertia for r in ours])
    assert inertia.mean() <= np.mean(ref) * 1.03
    assert inertia.min() <= min(ref) * (1 + 1e-3)


def test_kmeans_plusplus_seeds_one_centre_per_separated_blob() -> None:
    x, y = make_blobs(800, n_features=3, centers=6, cluster_std=0.3, center_box=(-40, 40), random_state=0)
    xt = torch.tensor(x)
    hits = 0
    for seed in range(10):
        seeds = kmeans_plusplus(xt, 6, torch.Generator().manual_seed(seed))
        rows = [int(np.flatnonzero((x == s.numpy()).all(1))[0]) for s in seeds]  # seeds are data points
        hits += len(set(y[rows])) == 6
    # Uniform random seeding would cover all six blobs with probability 6!/6^6 = 1.5 %.
    assert hits >= 9


def test_kmeans_duplicate_points_and_empty_clusters() -> None:
    x = torch.tensor([[0.0, 0.0]] * 10 + [[5.0, 5.0]] * 10 + [[9.0, 0.0]] * 10)
    res = kmeans(x, 3, seed=0)
    assert res.inertia == pytest.approx(0.0, abs=1e-9)
    assert len(torch.unique(res.labels)) == 3


def test_kmeans_deterministic_for_a_seed() -> None:
    x = torch.randn(300, 4)
    a, b = kmeans(x, 5, seed=3), kmeans(x, 5, seed=3)
    assert torch.equal(a.labels, b.labels) and a.inertia == b.inertia


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kmeans_on_gpu_matches_cpu() -> None:
    x, _ = make_blobs(5000, n_features=32, centers=10, random_state=0)
    xt = torch.tensor(x, dtype=torch.float32)
    gpu = kmeans(xt, 10, seed=0, device="cuda")
    cpu = kmeans(xt, 10, seed=0, device="cpu")
    assert gpu.labels.is_cuda
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)


def test_prototypes_are_the_members_nearest_each_centroid() -> None:
    x, _ = make_blobs(400, n_features=4, centers=4, random_state=1)
    xt = torch.tensor(x)
    res = kmeans(xt, 4, seed=0)
    protos = prototypes(xt, res, n=5)
    for j, idx in enumerate(protos):
        members = np.flatnonzero(res.labels.numpy() == j)
        d = ((x[members] - res.centroids[j].numpy()) ** 2).sum(1)
        assert idx.tolist() == members[np.argsort(d, kind="stable")[:5]].tolist()


@pytest.mark.parametrize("n,a,b", [(50, 3, 4), (200, 2, 10), (1000, 7, 7), (30, 30, 3)])
def test_nmi_ari_match_sklearn(n: int, a: int, b: int) -> None:
    g = torch.Generator().manual_seed(n + a + b)
    for _ in range(5):
        u = torch.randint(0, a, (n,), generator=g)
        v = torch.where(torch.rand(n, generator=g) < 0.5, u % b, torch.randint(0, b, (n,), generator=g))
        assert normalized_mutual_info(u, v) == pytest.approx(normalized_mutual_info_score(u, v), abs=1e-10)
        assert adjusted_rand_index(u, v) == pytest.approx(adjusted_rand_score(u, v), abs=1e-10)


def test_nmi_ari_edge_cases_match_sklearn() -> None:
    ident = torch.arange(7)
    cases = [(ident, ident), (ident, torch.zeros(7, dtype=torch.long)), (torch.zeros(5), torch.zeros(5)),
             (torch.tensor([0, 0, 1, 1]), torch.tensor([5, 5, 2, 2])), (torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))]
    for u, v in cases:
        assert normalized_mutual_info(u, v) == pytest.approx(normalized_mutual_info_score(u, v), abs=1e-10)
        assert adjusted_rand_index(u, v) == pytest.approx(adjusted_rand_score(u, v), abs=1e-10)
    assert cluster_purity(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1])) == pytest.approx(0.8)


def test_kmeans_recovers_blob_labels() -> None:
    x, y = make_blobs(600, n_features=8, centers=5, cluster_std=1.0, random_state=7)
    res = kmeans(torch.tensor(x), 5, seed=0)
    assert normalized_mutual_info(torch.tensor(y), res.labels) > 0.95


@pytest.mark.parametrize(
    "x,k,match",
    [(torch.randn(10), 2, "2-D"), (torch.randn(5, 3), 6, "between 1 and"), (torch.randn(5, 3), 0, "between 1 and"),
     (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, "NaN")],
)
def test_kmeans_bad_input(x: torch.Tensor, k: int, match: str) -> None:
    with pytest.raises(HistofmError, match=match):
        kmeans(x, k)


def test_metrics_bad_input() -> None:
    with pytest.raises(HistofmError, match="one of each per point"):
        adjusted_rand_index(torch.zeros(5), torch.zeros(4))
