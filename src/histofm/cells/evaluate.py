"""Held-out evaluation on the bundled HGSC field: the three segmenters compared with bootstrap intervals.

The held-out blocks (odd ``row + column`` of the 3 x 3 grid, see :mod:`histofm.cells.train`)
are cut into ``unit x unit`` tiles (250 px: 16 tiles); each tile's counts are the
bootstrap's unit, and every metric is recomputed from the summed counts of each resample.
"""

from __future__ import annotations

import numpy as np

from histofm.cells.metrics import bootstrap, majority_types, tile_stats
from histofm.cells.train import split_blocks


def evaluate_held_out(
    gt_inst: np.ndarray,
    gt_type_map: np.ndarray,
    pred_inst: np.ndarray,
    pred_types: dict[int, int],
    unit: int = 250,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """``{metric: (point, low, high)}`` of a whole-field prediction on the held-out blocks (95% intervals)."""
    gt_types = majority_types(gt_inst, gt_type_map)
    regions = split_blocks(gt_inst.shape, train=False)
    stats = tile_stats(gt_inst, pred_inst, gt_types, pred_types, regions, unit=unit)
    return bootstrap(stats, n_boot=n_boot, seed=seed)


def training_majority_type(gt_inst: np.ndarray, gt_type_map: np.ndarray) -> int:
    """The most frequent nucleus type in the training blocks (what a type-blind segmenter is assigned)."""
    counts = np.zeros(int(gt_type_map.max()) + 1, np.int64)
    types = majority_types(gt_inst, gt_type_map)
    for y0, x0, y1, x1 in split_blocks(gt_inst.shape, train=True):
        for i in np.unique(gt_inst[y0:y1, x0:x1]):
            if i:
                counts[types[int(i)]] += 1
    counts[0] = 0
    return int(counts.argmax())


def format_table(rows: dict[str, dict[str, tuple[float, float, float]]], keys: tuple[str, ...] = (
    "dice", "aji", "dq", "sq", "pq", "mpq")) -> str:
    """A Markdown table: one row per segmenter, ``point [low, high]`` per metric."""
    head = "| segmenter | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    lines = []
    for name, m in rows.items():
        cells = [f"{m[k][0]:.3f} [{m[k][1]:.3f}, {m[k][2]:.3f}]" if k in m else "n/a" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
