"""Nucleus segmentation metrics: Dice, AJI, PQ = SQ x RQ, multi-class mPQ, with bootstrap intervals.

With ground-truth nuclei ``G_i`` and predicted nuclei ``S_j``:

* **Dice** (pixel level, instances ignored): ``2 |G ∩ S| / (|G| + |S|)`` of the foreground masks.
* **AJI**, aggregated Jaccard index (Kumar et al. 2017, IEEE TMI 36(7)): each ``G_i`` is
  paired with the ``S_j`` of highest IoU (a prediction may be used several times),
  and predictions never used count against::

      AJI = sum_i |G_i ∩ S_j(i)| / ( sum_i |G_i ∪ S_j(i)| + sum_{unused j} |S_j| )

* **PQ**, panoptic quality (Kirillov et al. 2019, arXiv 1801.00868): pairs with IoU > 0.5
  are true positives (such a match is unique, because two disjoint predictions cannot
  both cover more than half of one union)::

      PQ = SQ x RQ,   SQ = sum_{TP} IoU / |TP|,   RQ = |TP| / (|TP| + |FP| / 2 + |FN| / 2)

  ``RQ`` is the detection F1 score; ``SQ`` the mean IoU of the matched pairs.
* **mPQ** (PanNuke, Gamper et al. 2020, arXiv 2003.10778): PQ per nucleus class with
  the ground truth and prediction restricted to that class, averaged over classes.

Metrics over many images (or tiles of one) are computed from summed counts
(:class:`SegStats`), so a bootstrap resamples the tiles and recomputes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from histofm.errors import HistofmError


def intersections(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Overlap counts of two label images.

    Returns ``(gt_ids (G,), pred_ids (P,), inter (G, P), gt_area (G,), pred_area (P,))``, background excluded.
    """
    gt, pred = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    if gt.shape != pred.shape:
        raise HistofmError(f"The label images differ in size ({gt.shape} and {pred.shape}); compare masks of the same image.")
    g_ids, g_inv = np.unique(gt, return_inverse=True)
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    table = np.bincount(g_inv * len(p_ids) + p_inv, minlength=len(g_ids) * len(p_ids)).reshape(len(g_ids), len(p_ids))
    g_area, p_area = table.sum(1), table.sum(0)
    g_keep, p_keep = g_ids != 0, p_ids != 0
    return g_ids[g_keep], p_ids[p_keep], table[np.ix_(g_keep, p_keep)], g_area[g_keep], p_area[p_keep]


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Pixel Dice of the foregrounds (1.0 when both are empty)."""
    a, b = np.asarray(gt) > 0, np.asarray(pred) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@dataclass
class SegStats:
    """Summable counts from which every metric is computed.

    Attributes:
        inter, total: Dice numerator half and denominator (``|G ∩ S|``, ``|G| + |S|``).
        aji_c, aji_u: AJI numerator and denominator.
        tp, fp, fn, iou: PQ counts and the summed IoU of matches (binary).
        per_class: ``{class: [tp, fp, fn, iou]}`` for mPQ.
    """

    inter: float = 0.0
    total: float = 0.0
    aji_c: float = 0.0
    aji_u: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0
    per_class: dict[int, list[float]] = field(default_factory=dict)

    def __add__(self, other: SegStats) -> SegStats:
        classes = set(self.per_class) | set(other.per_class)
        zero = [0, 0, 0, 0.0]
        return SegStats(
            self.inter + other.inter, self.total + other.total, self.aji_c + other.aji_c, self.aji_u + other.aji_u,
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou + other.iou,
            {c: [a + b for a, b in zip(self.per_class.get(c, zero), other.per_class.get(c, zero))] for c in classes},
        )

    def metrics(self) -> dict[str, float]:
        """``dice``, ``aji``, ``dq`` (= RQ), ``sq``, ``pq`` and, with classes, ``mpq`` and ``pq_<class>``."""
        out = {
            "dice": 2 * self.inter / self.total if self.total else 1.0,
            "aji": self.aji_c / self.aji_u if self.aji_u else 1.0,
            **_pq(self.tp, self.fp, self.fn, self.iou),
        }
        if self.per_class:
            pqs = {c: _pq(*v)["pq"] for c, v in sorted(self.per_class.items())}
            out.update({f"pq_{c}": v for c, v in pqs.items()})
            out["mpq"] = float(np.mean(list(pqs.values())))
        return out


def _pq(tp: float, fp: float, fn: float, iou: float) -> dict[str, float]:
    denom = tp + 0.5 * fp + 0.5 * fn
    dq = tp / denom if denom else 1.0  # nothing to find and nothing found: perfect
    sq = iou / tp if tp else (1.0 if denom == 0 else 0.0)
    return {"dq": float(dq), "sq": float(sq), "pq": float(dq * sq)}


def _pq_counts(g_area: np.ndarray, p_area: np.ndarray, inter: np.ndarray) -> tuple[int, int, int, float]:
    union = g_area[:, None] + p_area[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    match = iou > 0.5  # unique on both sides (see module docstring)
    tp = int(match.sum())
    return tp, len(p_area) - tp, len(g_area) - tp, float(iou[match].sum())


def seg_stats(
    gt: np.ndarray,
    pred: np.ndarray,
    gt_types: dict[int, int] | None = None,
    pred_types: dict[int, int] | None = None,
    classes: Sequence[int] = (),
) -> SegStats:
    """Counts of one image: ``gt`` and ``pred`` are label images ``(H, W)`` (0 background).

    ``gt_types`` / ``pred_types`` map instance labels to classes; with ``classes`` the
    per-class PQ counts are filled (each class present in the ``classes`` list gets an entry).
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    g_ids, p_ids, inter, g_area, p_area = intersections(gt, pred)
    a, b = gt > 0, pred > 0
    st = SegStats(inter=float((a & b).sum()), total=float(a.sum() + b.sum()))
    # AJI: each ground truth with its best-IoU prediction.
    if len(g_ids):
        union = g_area[:, None] + p_area[None, :] - inter
        iou = inter / np.maximum(union, 1)
        if len(p_ids):
            best = iou.argmax(1)
            has = inter[np.arange(len(g_ids)), best] > 0
            st.aji_c = float(inter[np.arange(len(g_ids)), best][has].sum())
            st.aji_u = float(union[np.arange(len(g_ids)), best][has].sum() + g_area[~has].sum())
            used = np.zeros(len(p_ids), bool)
            used[best[has]] = True
            st.aji_u += float(p_area[~used].sum())
        else:
            st.aji_u = float(g_area.sum())
    else:
        st.aji_u = float(p_area.sum())
    st.tp, st.fp, st.fn, st.iou = _pq_counts(g_area, p_area, inter)
    if classes:
        if gt_types is None or pred_types is None:
            raise HistofmError("Per-class counts need gt_types and pred_types; pass both or neither.")
        g_cls = np.array([gt_types.get(int(i), 0) for i in g_ids])
        p_cls = np.array([pred_types.get(int(i), 0) for i in p_ids])
        for c in classes:
            gi, pi = g_cls == c, p_cls == c
            # Restricting both label images to class c keeps the pairwise intersections of the kept instances.
            tp, fp, fn, s = _pq_counts(g_area[gi], p_area[pi], inter[np.ix_(gi, pi)])
            st.per_class[int(c)] = [tp, fp, fn, s]
    return st


def majority_types(inst: np.ndarray, types: np.ndarray) -> dict[int, int]:
    """Class of each instance: the most frequent non-zero value of ``types`` over its pixels (0 if none)."""
    inst, types = np.asarray(inst).ravel(), np.asarray(types).ravel().astype(np.int64)
    keep = (inst > 0) & (types > 0)
    if not keep.any():
        return {int(i): 0 for i in np.unique(inst) if i}
    n_cls = int(types.max()) + 1
    ids, inv = np.unique(inst[keep], return_inverse=True)
    votes = np.bincount(inv * n_cls + types[keep], minlength=len(ids) * n_cls).reshape(len(ids), n_cls)
    out = {int(i): 0 for i in np.unique(inst) if i}
    out.update({int(i): int(v.argmax()) for i, v in zip(ids, votes)})
    return out


def bootstrap(stats: Sequence[SegStats], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """``{metric: (point, low, high)}``: the point from all units, a percentile interval from resampled units."""
    if not stats:
        raise HistofmError("The bootstrap needs at least one unit (image or slide); pass a non-empty list.")
    point = sum(stats[1:], stats[0]).metrics()
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, len(stats), len(stats))
        m = sum((stats[i] for i in idx[1:]), stats[idx[0]]).metrics()
        for k in point:
            draws[k].append(m.get(k, np.nan))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (v, float(np.nanpercentile(draws[k], lo)), float(np.nanpercentile(draws[k], hi))) for k, v in point.items()}


def tile_stats(
    gt: np.ndarray,
    pred: np.ndarray,
    gt_types: dict[int, int],
    pred_types: dict[int, int],
    regions: Sequence[tuple[int, int, int, int]],
    unit: int = 250,
    classes: Sequence[int] = (1, 2, 3),
) -> list[SegStats]:
    """Counts of every ``unit x unit`` tile of the ``(y0, x0, y1, x1)`` regions: the units of a bootstrap.

    Both label images are cut the same way, so a nucleus crossing a tile border is
    compared part against part.
    """
    out = []
    for y0, x0, y1, x1 in regions:
        for y in range(y0, y1, unit):
            for x in range(x0, x1, unit):
                sl = (slice(y, min(y + unit, y1)), slice(x, min(x + unit, x1)))
                out.append(seg_stats(gt[sl], pred[sl], gt_types, pred_types, classes))
    return out
