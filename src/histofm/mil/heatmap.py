"""Attention heatmaps: per-tile scores of a trained run over the slide, as a picture and as data.

The models are chosen and their scores averaged as in :mod:`histofm.mil.predict`
(a training slide gets the fold model that held it out). Each tile paints its
footprint on the thumbnail (``coords`` are level-0 top-left corners; the tile side
comes from ``patch_size_level0``, else ``tile_size * mpp / level0_mpp``, else the
coordinate grid step); overlapping tiles are averaged. :func:`render_heatmap`
writes into a folder:

* ``<slide>_heatmap.png``: the slide beside the overlay;
* ``<slide>_scores.h5`` and ``<slide>_scores.csv``: per tile, level-0 ``x, y``, the
  percentile ``score`` and the raw ``attention``;
* ``<slide>_scores.geojson``: the tiles as QuPath objects (see :mod:`histofm.wsi.qupath`),
  classified into score deciles coloured like the heatmap, with both values as measurements.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofm.errors import HistofmError
from histofm.mil.base import MILAggregator
from histofm.mil.predict import (
    choose_models,
    percentiles,
    score_bag,
    tile_size_level0,
    write_tile_csv,
    write_tile_scores,
)
from histofm.utils import atomic_path

__all__ = ["paint", "percentiles", "render_heatmap", "slide_scores", "tile_size_level0"]


@torch.no_grad()
def slide_scores(models: list[MILAggregator], features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean class probabilities ``(C,)`` and mean percentile scores ``(N,)`` over classification ``models``."""
    res = score_bag(models, {"task": "classification"}, features)
    if res["score"] is None:
        raise HistofmError(f"Aggregator {type(models[0]).__name__} has no per-tile scores to draw; train abmil, clam or transmil.")
    return res["probs"], res["score"]


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


def check_same_slide(attrs: dict[str, Any], slide_path: str | os.PathLike[str], features_path: Path) -> None:
    """Refuse features whose recorded slide fingerprint (``histofm extract`` writes one) is not ``slide_path``'s.

    The content fingerprint decides, not the name: a renamed slide still matches, another scan
    under the same name does not. Files without a fingerprint (other tools, synthetic bags) are
    drawn as given.
    """
    from histofm.wsi.provenance import slide_fingerprint

    def text(key: str) -> str | None:
        value = attrs.get(key)
        return value.decode() if isinstance(value, bytes) else value

    fingerprint = text("slide_fingerprint")
    if not fingerprint or fingerprint == slide_fingerprint(slide_path):
        return
    raise HistofmError(
        f"{features_path.name} holds the tiles of slide {text('slide') or 'another slide'!r}, not "
        f"{Path(slide_path).name} (their contents differ); pass that slide's features to --features "
        "(or its file to --slide)."
    )


def render_heatmap(
    slide_path: str | os.PathLike[str],
    features_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fold: int | None = None,
    max_size: int = 1024,
    alpha: float = 0.5,
    cmap: str = "jet",
    object_type: str = "tile",
) -> dict[str, Any]:
    """Draw the per-tile scores of the run in ``run_dir`` over ``slide_path``; write PNG, tables and GeoJSON.

    Returns:
        ``{"probabilities": {class: p} (or "risk"), "models": description, "heat": (H, W) array,
        "tiles": N, "png", "h5", "csv", "geojson": paths}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histofm.mil.data import check_finite
    from histofm.mil.provenance import check_against_run
    from histofm.mil.run import load_trained
    from histofm.wsi.features import read_features
    from histofm.wsi.qupath import score_classes, tile_features, write_geojson
    from histofm.wsi.readers import open_slide

    features_path = Path(features_path)
    if not features_path.is_file():
        raise HistofmError(f"Features file not found: {features_path}; pass a .h5 written by `histofm extract` to --features.")
    if not Path(slide_path).is_file():
        raise HistofmError(f"Slide not found: {slide_path}; check --slide.")
    models, cfg = load_trained(run_dir, fold)
    check_against_run(features_path, cfg.get("provenance", {}))
    features, coords, attrs = read_features(features_path)
    check_same_slide(attrs, slide_path, features_path)
    check_finite(np.asarray(features), features_path)
    if features.shape[1] != cfg["in_dim"]:
        raise HistofmError(
            f"{features_path.name} has {features.shape[1]}-d features but the models were trained on "
            f"{cfg['in_dim']}-d ones; use features from the same encoder."
        )
    chosen, used = choose_models(models, cfg, features_path.stem, fold)
    res = score_bag(chosen, cfg, features)
    if res["score"] is None:
        raise HistofmError(f"Aggregator {cfg['aggregator']!r} has no per-tile scores to draw; train abmil, clam or transmil.")
    scores = res["score"]
    with open_slide(slide_path) as slide:
        dims = slide.dimensions
        thumb = np.asarray(slide.thumbnail(max_size).convert("RGB"))
    if coords.size and (coords[:, 0].max() >= dims[0] or coords[:, 1].max() >= dims[1]):
        raise HistofmError(
            f"Tile coordinates reach beyond the slide ({dims[0]} x {dims[1]} px); "
            f"{features_path.name} was not extracted from {Path(slide_path).name}."
        )
    size0 = tile_size_level0(coords, attrs)
    heat = paint(coords, scores, size0, dims, thumb.shape[:2])
    if res["probs"] is not None:
        outcome: dict[str, Any] = {"probabilities": dict(zip(cfg["class_names"], res["probs"].tolist()))}
        title = ", ".join(f"{n}: {p:.2f}" for n, p in outcome["probabilities"].items())
    else:
        outcome = {"risk": res["risk"]}
        title = f"risk {res['risk']:.3f}"
    # The slide alone beside the overlay, so the tissue under the colours can be read.
    aspect = thumb.shape[0] / thumb.shape[1]
    fig, (ax0, ax) = plt.subplots(1, 2, figsize=(12, 6 * aspect + 0.8), dpi=120)
    ax0.imshow(thumb)
    ax0.set_title(Path(slide_path).name, fontsize=9)
    ax.imshow(thumb)
    im = ax.imshow(np.ma.masked_invalid(heat), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{cfg['aggregator']} tile scores: {title}\n{used}", fontsize=9)
    for a in (ax0, ax):
        a.set_axis_off()
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label="tile score (percentile)")
    out = Path(out_dir)
    stem = features_path.stem
    with atomic_path(out / f"{stem}_heatmap.png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    values = {"score": scores, "attention": res["attention"]}
    h5 = write_tile_scores(out / f"{stem}_scores.h5", coords, values,
                           {"slide": stem, "models": used, "patch_size_level0": size0})
    table = write_tile_csv(out / f"{stem}_scores.csv", coords, values)
    names, colours = score_classes(scores, cmap=cmap)
    geojson = write_geojson(out / f"{stem}_scores.geojson",
                            tile_features(coords, size0, names, colours, values, object_type, id_prefix=stem))
    return {**outcome, "models": used, "heat": heat, "tiles": len(coords), "png": out / f"{stem}_heatmap.png",
            "h5": h5, "csv": table, "geojson": geojson}
