"""Nucleus polygons as a QuPath GeoJSON FeatureCollection (one "detection" per nucleus).

QuPath (File > Import objects, or drag and drop) reads a FeatureCollection whose
features carry ``properties.objectType`` (``"detection"`` for cells and nuclei),
``properties.classification`` (``{"name", "color": [r, g, b]}``) and optional
``properties.measurements``. Coordinates are level-0 pixels ``(x, y)`` with the
origin at the slide's top-left corner.

Each outline is the 0.5 iso-contour of the nucleus' binary mask (marching
squares, :func:`skimage.measure.find_contours`), which runs along pixel edges'
midpoints and never crosses itself, so every polygon is valid; a nucleus with
several pieces keeps its largest.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

#: QuPath's default colours of the PanNuke-style classes; others cycle through a palette.
TYPE_COLORS = {
    "neoplastic": (200, 0, 0),
    "inflammatory": (0, 160, 0),
    "connective": (0, 90, 200),
    "dead": (90, 90, 90),
    "epithelial": (230, 170, 0),
}
_PALETTE = [(148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34)]
_NAMESPACE = uuid.UUID("6f1c7d3e-0b7a-4a57-9d0e-2f4a8d6c9b10")


def type_color(name: str, index: int) -> tuple[int, int, int]:
    """Display colour of a class name (a fixed colour for known names, else from a palette)."""
    return TYPE_COLORS.get(name.lower(), _PALETTE[index % len(_PALETTE)])


def nucleus_polygon(mask: np.ndarray) -> list[list[float]] | None:
    """Closed exterior ring ``[[x, y], ...]`` (positive signed area) of a binary mask, in its pixel frame."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return None
    ring = max(contours, key=len)[:, ::-1] - 1.0  # (n, 2) (x, y); undo the padding
    if len(ring) < 4:
        return None
    x, y = ring[:, 0], ring[:, 1]
    area2 = float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))  # twice the signed (shoelace) area
    if area2 < 0:  # exterior rings counter-clockwise in (x, y), i.e. positive area (RFC 7946)
        ring = ring[::-1]
    ring = np.round(ring, 2)
    if np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    # Drop vertices on a straight line between their neighbours (exact, so the outline is unchanged).
    prev, nxt = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    cross = (ring[:, 0] - prev[:, 0]) * (nxt[:, 1] - ring[:, 1]) - (ring[:, 1] - prev[:, 1]) * (nxt[:, 0] - ring[:, 0])
    if (np.abs(cross) > 1e-9).sum() >= 3:
        ring = ring[np.abs(cross) > 1e-9]
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    return ring.tolist()


def nuclei_features(
    mask: np.ndarray,
    type_id: Sequence[int],
    probability: Sequence[float],
    type_names: Sequence[str],
    offset: tuple[float, float] = (0.0, 0.0),
) -> list[dict[str, Any]]:
    """One QuPath detection per label ``1..n`` of ``mask``; ``type_id[i]`` (1..T) and ``probability[i]`` for label ``i + 1``.

    ``offset`` ``(x, y)`` is added to every coordinate (the mask's origin in level-0 pixels).
    """
    from scipy import ndimage

    features = []
    for i, sl in enumerate(ndimage.find_objects(mask)):
        if sl is None:
            continue
        ring = nucleus_polygon(mask[sl] == i + 1)
        if ring is None:
            continue
        dx, dy = sl[1].start + offset[0], sl[0].start + offset[1]
        ring = [[round(x + dx, 2), round(y + dy, 2)] for x, y in ring]
        t = int(type_id[i])
        name = type_names[t - 1] if 1 <= t <= len(type_names) else "unknown"
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{i + 1}:{dx}:{dy}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": name, "color": list(type_color(name, t - 1))},
                "measurements": {"area_px": int((mask[sl] == i + 1).sum()), "probability": round(float(probability[i]), 4)},
                "nucleus_id": i + 1,
            },
        })
    return features
