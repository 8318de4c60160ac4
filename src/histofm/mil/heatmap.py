"""Attention heatmaps: per-tile scores of trained aggregators drawn over the slide thumbnail.

Scores of different models live on different scales (attention weights, logit
contributions), so each model's scores are turned into percentiles within the
slide (as CLAM does) and averaged over the fold models. Each tile paints its
footprint on the thumbnail (``coords`` are level-0 top-left corners; the tile
side comes from the features file's ``patch_size_level0`` attribute or, failing
that, from the coordinate grid step); overlapping tiles are averaged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofm.errors import HistofmError
from histofm.eval.metrics import rankdata
from histofm.mil.base import MILAggregator
from histofm.utils import atomic_path


def tile_size_level0(coords: np.ndarray, attrs: dict[str, Any]) -> float:
    """Tile side in level-0 pixels, from the file attributes or the smallest grid step."""
    for key in ("patch_size_level0", "size_level0"):
        if key in attrs and float(attrs[key]) > 0:
            return float(attrs[key])
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
    steps = [s[s > 0] for s in steps if len(s)]
    if not steps or not any(len(s) for s in steps):
        raise HistofmError("Cannot tell the tile size: the features file has no patch_size_level0 attribute and one tile.")
    return float(min(s.min() for s in steps if len(s)))


def percentiles(scores: np.ndarray) -> np.ndarray:
    """Scores to their percentile rank in ``[0, 1]`` (ties share their mean rank)."""
    return (rankdata(np.asarray(scores, dtype=np.float64)) - 1) / max(len(scores) - 1, 1)


@torch.no_grad()
def slide_scores(models: list[MILAggregator], features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean class probabilities ``(C,)`` and mean percentile scores ``(N,)`` over the models."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32)).unsqueeze(0)
    probs, scores = [], []
    for model in models:
        out = model.eval()(x)
        if out.scores is None:
            raise HistofmError(f"Aggregator {type(model).__name__} has no per-tile scores to draw; train abmil, clam or transmil.")
        probs.append(torch.softmax(out.logits.double(), -1)[0].numpy())
        scores.append(percentiles(out.scores[0].double().numpy()))
    return np.mean(probs, axis=0), np.mean(scores, axis=0)


def paint(
    coords: np.ndarray, values: np.ndarray, size_level0: float, dimensions: tuple[int, int], shape: tuple[int, int]
) -> np.ndarray:
    """A ``shape = (H, W)`` map with each tile's value averaged over its footprint; NaN where no tile is."""
    h, w = shape
    sx, sy = w / dimensions[0], h / dimensions[1]
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    for (x, y), v in zip(np.asarray(coords, dtype=np.float64), values):
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1 = max(int(np.ceil((x + size_level0) * sx)), x0 + 1)
        y1 = max(int(np.ceil((y + size_level0) * sy)), y0 + 1)
        total[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] += v
        count[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def render_heatmap(
    slide_path: str | os.PathLike[str],
    features_path: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    fold: int | None = None,
    max_size: int = 1024,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> dict[str, Any]:
    """Draw the per-tile scores of the models in ``model_dir`` over ``slide_path``; write a PNG.

    Returns:
        ``{"probabilities": {class: p}, "heat": (H, W) array, "tiles": N, "png": path}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histofm.mil.train import load_trained
    from histofm.wsi.features import read_features
    from histofm.wsi.readers import open_slide

    features, coords, attrs = read_features(features_path)
    models, cfg = load_trained(model_dir, fold)
    if features.shape[1] != cfg["in_dim"]:
        raise HistofmError(
            f"{Path(features_path).name} has {features.shape[1]}-d features but the models were trained on "
            f"{cfg['in_dim']}-d ones; use features from the same encoder."
        )
    probs, scores = slide_scores(models, features)
    with open_slide(slide_path) as slide:
        dims = slide.dimensions
        thumb = np.asarray(slide.thumbnail(max_size).convert("RGB"))
    if coords.size and (coords[:, 0].max() >= dims[0] or coords[:, 1].max() >= dims[1]):
        raise HistofmError(
            f"Tile coordinates reach beyond the slide ({dims[0]} x {dims[1]} px); "
            f"{Path(features_path).name} was not extracted from {Path(slide_path).name}."
        )
    heat = paint(coords, scores, tile_size_level0(coords, attrs), dims, thumb.shape[:2])
    names = cfg["class_names"]
    title = ", ".join(f"{n}: {p:.2f}" for n, p in zip(names, probs))
    # The slide alone beside the overlay, so the tissue under the colours can be read.
    aspect = thumb.shape[0] / thumb.shape[1]
    fig, (ax0, ax) = plt.subplots(1, 2, figsize=(12, 6 * aspect + 0.8), dpi=120)
    ax0.imshow(thumb)
    ax0.set_title(Path(slide_path).name, fontsize=9)
    ax.imshow(thumb)
    im = ax.imshow(np.ma.masked_invalid(heat), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{cfg['model']} tile scores ({len(models)} model(s)) - {title}", fontsize=9)
    for a in (ax0, ax):
        a.set_axis_off()
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label="tile score (percentile)")
    out = Path(out_path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return {"probabilities": dict(zip(names, probs.tolist())), "heat": heat, "tiles": len(coords), "png": out}
