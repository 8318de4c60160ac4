"""Nucleus metrics: hand-computed cases, a brute-force reading of the definitions, and scikit-image's contingency table."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import contingency_table

from histofm.cells.metrics import (
    SegStats,
    bootstrap,
    dice,
    intersections,
    majority_types,
    seg_stats,
    tile_stats,
)
from histofm.errors import HistofmError


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """GT: A (4x4 = 16 px) and B (2x2 = 4 px). Pred: P covers A's left 3 columns + 1 column outside (16 px), Q a false positive (4 px)."""
    gt = np.zeros((10, 12), np.int32)
    gt[1:5, 1:5] = 1  # A
    gt[7:9, 7:9] = 2  # B
    pred = np.zeros_like(gt)
    pred[1:5, 0:4] = 5  # P: overlaps A in 12 px, union 20 px -> IoU 0.6
    pred[7:9, 1:3] = 9  # Q: touches nothing
    return gt, pred


def test_hand_computed_case() -> None:
    gt, pred = _hand_case()
    m = seg_stats(gt, pred).metrics()
    assert m["dice"] == pytest.approx(2 * 12 / (20 + 20))
    # AJI: A pairs with P (12 / 20); B has no overlapping prediction (0 / 4); Q unused (+4).
    assert m["aji"] == pytest.approx(12 / (20 + 4 + 4))
    # PQ: one match at IoU 0.6; FP = Q, FN = B.
    assert m["dq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert m["sq"] == pytest.approx(0.6)
    assert m["pq"] == pytest.approx(0.3)
    assert dice(gt, pred) == pytest.approx(m["dice"])


def test_iou_exactly_half_is_not_a_match() -> None:
    gt = np.zeros((4, 8), np.int32)
    gt[:, :4] = 1
    pred = np.zeros_like(gt)
    pred[:, 2:6] = 1  # intersection 8, union 24
    pred2 = np.zeros_like(gt)
    pred2[:, 0:6] = 1  # intersection 16, union 24: IoU 2/3
    assert seg_stats(gt, pred).tp == 0
    st = seg_stats(gt, pred2)
    assert (st.tp, st.fp, st.fn) == (1, 0, 0) and st.iou == pytest.approx(2 / 3)
    half = np.zeros_like(gt)
    half[:, :2] = 1  # IoU exactly 0.5: not a match (PQ needs IoU > 0.5)
    assert seg_stats(gt, half).tp == 0


def test_intersections_match_skimage_contingency_table() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (30, 40))
    pred = rng.integers(0, 9, (30, 40)) * 3  # labels need not be consecutive
    g_ids, p_ids, inter, g_area, p_area = intersections(gt, pred)
    table = contingency_table(gt, pred).toarray()  # rows/cols indexed by the label value itself
    np.testing.assert_array_equal(inter, table[np.ix_(g_ids, p_ids)])
    np.testing.assert_array_equal(g_area, [(gt == i).sum() for i in g_ids])
    np.testing.assert_array_equal(p_area, [(pred == j).sum() for j in p_ids])


def _brute_force(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """AJI and PQ straight from the definitions, one instance pair at a time."""
    gs, ps = [i for i in np.unique(gt) if i], [j for j in np.unique(pred) if j]
    c = u = 0.0
    used = set()
    for i in gs:
        g = gt == i
        ious = [((g & (pred == j)).sum() / (g | (pred == j)).sum(), j) for j in ps]
        best = max(ious, default=(0.0, None))
        if best[1] is None or best[0] == 0:
            u += g.sum()
            continue
        s = pred == best[1]
        c, u = c + (g & s).sum(), u + (g | s).sum()
        used.add(best[1])
    u += sum((pred == j).sum() for j in ps if j not in used)
    tp, iou_sum = 0, 0.0
    for i in gs:
        for j in ps:
            iou = ((gt == i) & (pred == j)).sum() / ((gt == i) | (pred == j)).sum()
            if iou > 0.5:
                tp, iou_sum = tp + 1, iou_sum + iou
    fp, fn = len(ps) - tp, len(gs) - tp
    pq = (iou_sum / tp) * (tp / (tp + fp / 2 + fn / 2)) if tp else 0.0
    return c / u, pq


def _blobs(rng: np.random.Generator, n: int, shape: tuple[int, int] = (48, 48)) -> np.ndarray:
    lab = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        h, w = rng.integers(3, 7, 2)
        lab[y : y + h, x : x + w] = k
    return lab


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aji_and_pq_equal_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = _blobs(rng, 12)
    pred = np.roll(gt, (1, rng.integers(0, 3)), axis=(0, 1))  # shifted copy: a mix of matches and misses
    extra = _blobs(rng, 4)
    pred[extra > 0] = 50 + extra[extra > 0]  # some extra objects, partly over shifted ones
    aji, pq = _brute_force(gt, pred)
    m = seg_stats(gt, pred).metrics()
    assert m["aji"] == pytest.approx(aji)
    assert m["pq"] == pytest.approx(pq)


def test_multiclass_pq_per_class() -> None:
    gt, pred = _hand_case()
    # A is class 1, B class 2; P predicted class 1, Q class 2.
    st = seg_stats(gt, pred, {1: 1, 2: 2}, {5: 1, 9: 2}, classes=(1, 2))
    m = st.metrics()
    assert m["pq_1"] == pytest.approx(0.6)  # one match, nothing else of class 1
    assert m["pq_2"] == 0.0  # B missed, Q wrong
    assert m["mpq"] == pytest.approx(0.3)
    wrong = seg_stats(gt, pred, {1: 1, 2: 2}, {5: 2, 9: 2}, classes=(1, 2)).metrics()
    assert wrong["pq_1"] == 0.0  # right outline, wrong class: no credit
    with pytest.raises(HistofmError, match="gt_types"):
        seg_stats(gt, pred, classes=(1,))


def test_perfect_and_empty() -> None:
    gt, _ = _hand_case()
    m = seg_stats(gt, gt, {1: 1, 2: 2}, {1: 1, 2: 2}, classes=(1, 2)).metrics()
    assert all(v == pytest.approx(1.0) for v in m.values())
    empty = np.zeros_like(gt)
    m0 = seg_stats(gt, empty).metrics()
    assert (m0["dice"], m0["aji"], m0["pq"]) == (0.0, 0.0, 0.0)
    assert seg_stats(empty, empty).metrics()["pq"] == 1.0


def test_summed_stats_and_bootstrap() -> None:
    gt, pred = _hand_case()
    types = {1: 1, 2: 2}
    tiles = tile_stats(gt, pred, types, {5: 1, 9: 2}, [(0, 0, 10, 12)], unit=6, classes=(1, 2))
    assert len(tiles) == 4
    total = sum(tiles[1:], tiles[0])
    assert isinstance(total, SegStats)
    assert total.inter == seg_stats(gt, pred).inter  # pixel counts add up exactly over tiles
    res = bootstrap(tiles, n_boot=200, seed=0)
    for point, lo, hi in res.values():
        assert lo <= point + 1e-9 and point <= hi + 1e-9
    assert res["dice"][0] == pytest.approx(total.metrics()["dice"])


def test_majority_types() -> None:
    inst = np.array([[1, 1, 1, 2], [0, 0, 2, 2]])
    types = np.array([[3, 3, 1, 0], [0, 0, 0, 0]])
    assert majority_types(inst, types) == {1: 3, 2: 0}
