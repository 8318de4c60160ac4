"""Per-tile results as a GeoJSON FeatureCollection that QuPath imports (File > Import objects, or drag and drop).

Each tile becomes one feature: a square polygon in level-0 pixel coordinates
(QuPath's image space: x right, y down), with the properties QuPath reads::

    {"type": "Feature", "id": "...",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x+s, y], [x+s, y+s], [x, y+s], [x, y]]]},
     "properties": {"objectType": "tile",
                    "classification": {"name": "cluster 2", "color": [44, 160, 44]},
                    "measurements": {"score": 0.93, "attention": 0.0012}}}

``objectType`` is ``"tile"`` (QuPath's tile objects, the default), ``"detection"`` or
``"annotation"``. Measurements appear in QuPath's measurement tables and can colour
a measurement map; the classification colours the tiles directly.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histofm.errors import HistofmError
from histofm.utils import atomic_path

OBJECT_TYPES = ("tile", "detection", "annotation")


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def tile_polygon(x: float, y: float, size: float) -> list[list[list[int | float]]]:
    """The closed ring of a square tile with top-left ``(x, y)`` and side ``size`` (level-0 pixels)."""
    x0, y0, x1, y1 = (_number(v) for v in (x, y, x + size, y + size))
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def tile_features(
    coords: np.ndarray,
    size_level0: float,
    classes: Sequence[str],
    colours: Mapping[str, Sequence[int]],
    measurements: Mapping[str, np.ndarray] | None = None,
    object_type: str = "tile",
    id_prefix: str = "histofm",
) -> dict[str, Any]:
    """A FeatureCollection with one square polygon per tile.

    Args:
        coords: ``(N, 2)`` level-0 top-left ``(x, y)`` of each tile.
        size_level0: tile side in level-0 pixels.
        classes: ``N`` classification names (one per tile).
        colours: RGB 0-255 of each class name.
        measurements: name -> ``(N,)`` values, shown in QuPath's measurement table.
        object_type: ``"tile"``, ``"detection"`` or ``"annotation"``.
        id_prefix: seeds the stable per-feature ids (use the slide name).
    """
    if object_type not in OBJECT_TYPES:
        raise HistofmError(f"Unknown QuPath object type {object_type!r}; choose one of {', '.join(OBJECT_TYPES)}.")
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(classes) != len(coords):
        raise HistofmError(f"Tiles need (N, 2) coordinates and N class names, got {coords.shape} and {len(classes)}.")
    if not size_level0 > 0:
        raise HistofmError(f"The tile side must be positive, got {size_level0}.")
    measurements = {k: np.asarray(v, dtype=np.float64) for k, v in (measurements or {}).items()}
    for k, v in measurements.items():
        if v.shape != (len(coords),):
            raise HistofmError(f"Measurement {k!r} has shape {v.shape}, expected one value per tile ({len(coords)}).")
    features = []
    for i, ((x, y), name) in enumerate(zip(coords.tolist(), classes)):
        props: dict[str, Any] = {
            "objectType": object_type,
            "classification": {"name": str(name), "color": [int(c) for c in colours[name]]},
        }
        if measurements:
            props["measurements"] = {k: float(v[i]) for k, v in measurements.items() if np.isfinite(v[i])}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{id_prefix}/{i}")),
            "geometry": {"type": "Polygon", "coordinates": tile_polygon(x, y, size_level0)},
            "properties": props,
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike[str], collection: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection atomically (compact JSON: a slide has tens of thousands of tiles)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection, separators=(",", ":")))
    return path


def score_classes(scores: np.ndarray, n_bins: int = 10, cmap: str = "jet") -> tuple[list[str], dict[str, list[int]]]:
    """Bin scores in ``[0, 1]`` into ``n_bins`` named classes (``"score 0.9-1.0"``) coloured like the heatmap."""
    from matplotlib import colormaps

    colour_map = colormaps[cmap]
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    idx = np.minimum((s * n_bins).astype(int), n_bins - 1)
    names = [f"score {b / n_bins:.1f}-{(b + 1) / n_bins:.1f}" for b in range(n_bins)]
    colours = {n: [int(round(255 * c)) for c in colour_map((b + 0.5) / n_bins)[:3]] for b, n in enumerate(names)}
    return [names[i] for i in idx], colours
