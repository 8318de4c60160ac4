"""Tissue detection on a slide thumbnail: saturation, Otsu, morphology, holes, minimum area.

Stained tissue is coloured and glass is grey-white, so the HSV saturation
``S = (max(R,G,B) - min(R,G,B)) / max(R,G,B)`` separates them well on H&E and IHC.
The steps, all on a thumbnail of about ``mask_mpp`` microns per pixel:

1. saturation, smoothed by a 3 x 3 mean (JPEG noise, dust);
2. threshold ``t = max(otsu(S), min_saturation)``: Otsu's threshold maximises the
   between-class variance ``w0 w1 (mu0 - mu1)^2`` of the saturation histogram; the floor
   keeps a blank slide (one mode, Otsu meaningless) free of "tissue";
   very dark pixels (scanner borders, black ink) are excluded;
3. closing then opening (join nearby fragments, drop specks);
4. holes smaller than ``max_hole_um2`` are filled (vessel lumens, small tears);
5. connected pieces smaller than ``min_area_um2`` are removed.

The result, :class:`TissueMask`, knows its scale relative to level 0, gives the tissue
fraction of any level-0 box, and exports a PNG and GeoJSON contours in level-0 pixels.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from histofm.utils import atomic_path
from histofm.wsi.readers import SlideReader

# Morphology assumes this resolution when the slide has no mpp.
_FALLBACK_MASK_MPP = 4.0


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask on a thumbnail grid and its scale to level 0.

    Attributes:
        mask: ``(h, w)`` bool, True where tissue is.
        downsample: level-0 pixels per mask pixel along ``(x, y)``.
        slide_dimensions: level-0 ``(width, height)`` of the slide.
        threshold: the saturation threshold that was used (0..1).
        mpp: level-0 microns per pixel, if known.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    slide_dimensions: tuple[int, int]
    threshold: float
    mpp: float | None = None

    @property
    def fraction(self) -> float:
        """Fraction of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    def tile_fractions(self, coords: np.ndarray, size_level0: float) -> np.ndarray:
        """Tissue fraction of each square level-0 box ``(x, y, x + size, y + size)``.

        Args:
            coords: ``(N, 2)`` level-0 top-left corners ``(x, y)``.
            size_level0: side of the boxes in level-0 pixels.

        Returns:
            ``(N,)`` float fractions in ``[0, 1]``; area outside the slide counts as background.
        """
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        h, w = self.mask.shape
        # Integral image with a zero first row/column: sum over [y0, y1) x [x0, x1) in O(1).
        integral = np.zeros((h + 1, w + 1), dtype=np.int64)
        integral[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        sx, sy = self.downsample
        x0 = np.clip(np.round(coords[:, 0] / sx), 0, w).astype(np.int64)
        y0 = np.clip(np.round(coords[:, 1] / sy), 0, h).astype(np.int64)
        x1 = np.clip(np.round((coords[:, 0] + size_level0) / sx), 0, w).astype(np.int64)
        y1 = np.clip(np.round((coords[:, 1] + size_level0) / sy), 0, h).astype(np.int64)
        # Boxes smaller than a mask pixel still look at the pixel they fall in.
        x1 = np.maximum(x1, np.minimum(x0 + 1, w))
        y1 = np.maximum(y1, np.minimum(y0 + 1, h))
        x0, y0 = np.minimum(x0, x1), np.minimum(y0, y1)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        # Denominator: the whole box in mask pixels, so parts beyond the slide count as background.
        box_area = max((size_level0 / sx) * (size_level0 / sy), 1.0)
        return np.clip(inside / box_area, 0.0, 1.0)

    def to_image(self) -> Image.Image:
        """The mask as an 8-bit image (255 = tissue)."""
        return Image.fromarray(self.mask.astype(np.uint8) * 255)

    def save_png(self, path: str | os.PathLike[str]) -> Path:
        """Write the mask as a PNG (255 = tissue), atomically."""
        with atomic_path(path) as tmp:
            self.to_image().save(tmp, format="PNG")
        return Path(path)

    def contours(self) -> list[list[np.ndarray]]:
        """Tissue outlines as polygons in level-0 pixel coordinates.

        Returns:
            One entry per tissue piece: a list of closed rings ``(K, 2)`` ``(x, y)``, the
            first the outer boundary (positive shoelace area in ``(x, y)``: counter-clockwise
            with the y axis pointing up, as GeoJSON's right-hand rule reads it), the others its
            holes (negative area).
        """
        from contourpy import FillType, contour_generator  # matplotlib's contouring engine

        if self.is_empty:
            return []
        # Pad so pieces touching the border still close; the 0.5 iso-line runs along pixel edges'
        # midpoints between tissue and background pixel centres.
        padded = np.pad(self.mask.astype(np.float64), 1)
        gen = contour_generator(z=padded, fill_type=FillType.OuterOffset, corner_mask=True)
        filled, offsets = gen.filled(0.5, 2.0)
        sx, sy = self.downsample
        polygons = []
        for points, offs in zip(filled, offsets):
            rings = []
            for k, (a, b) in enumerate(zip(offs[:-1], offs[1:])):
                ring = points[a:b].astype(np.float64)
                # Padded index -> continuous mask coordinates (pixel i spans [i, i + 1)) -> level 0.
                ring = (ring - 1.0 + 0.5) * np.array([sx, sy])
                if not np.array_equal(ring[0], ring[-1]):
                    ring = np.vstack([ring, ring[:1]])
                area = _signed_area(ring)
                if (k == 0 and area < 0) or (k > 0 and area > 0):
                    ring = ring[::-1]
                rings.append(ring)
            polygons.append(rings)
        return polygons

    def to_geojson(self, name: str | None = None) -> dict[str, Any]:
        """A GeoJSON ``FeatureCollection`` of tissue polygons in level-0 pixels."""
        features = []
        for i, rings in enumerate(self.contours()):
            area_px = abs(_signed_area(rings[0])) - sum(abs(_signed_area(r)) for r in rings[1:])
            props: dict[str, Any] = {"tissue_id": i, "area_px": round(area_px, 1)}
            if self.mpp is not None:
                props["area_um2"] = round(area_px * self.mpp**2, 1)
            if name is not None:
                props["slide"] = name
            features.append(
                {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[round(float(x), 2), round(float(y), 2)] for x, y in r] for r in rings],
                    },
                    "properties": props,
                }
            )
        return {"type": "FeatureCollection", "features": features}

    def save_geojson(self, path: str | os.PathLike[str], name: str | None = None) -> Path:
        """Write :meth:`to_geojson` to ``path`` atomically."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_geojson(name)))
        return Path(path)


def detect_tissue(
    slide: SlideReader,
    *,
    mask_mpp: float = 4.0,
    max_size: int = 4096,
    min_saturation: float = 0.05,
    max_darkness: float = 0.12,
    smooth_um: float = 8.0,
    min_area_um2: float = 3_000.0,
    max_hole_um2: float = 20_000.0,
) -> TissueMask:
    """Find tissue on a thumbnail of ``slide``.

    Args:
        slide: an open slide.
        mask_mpp: resolution of the thumbnail the mask is computed on (microns per pixel).
            Without slide mpp the thumbnail's longer side is 1024 pixels.
        max_size: cap on the thumbnail's longer side.
        min_saturation: the lowest threshold allowed (0..1): a blank slide stays blank.
        max_darkness: pixels whose brightest channel is below this (0..1) are not tissue.
        smooth_um: radius of the closing and opening, in microns.
        min_area_um2: tissue pieces smaller than this are dropped.
        max_hole_um2: holes smaller than this inside tissue are filled.

    Returns:
        The :class:`TissueMask` (possibly empty: callers decide whether that is an error).
    """
    w0, h0 = slide.dimensions
    mpp = slide.mpp if slide.has_mpp else None
    if mpp is not None:
        long_side = max(w0, h0) * mpp / mask_mpp
    else:
        long_side = 1024
    long_side = int(min(max(w0, h0), max_size, max(64, round(long_side))))
    thumb = np.asarray(slide.thumbnail(long_side))  # (h, w, 3) uint8
    h, w = thumb.shape[:2]
    downsample = (w0 / w, h0 / h)
    # Microns per mask pixel; fall back to a nominal value for morphology sizes.
    px_um = mpp * math.sqrt(downsample[0] * downsample[1]) if mpp is not None else _FALLBACK_MASK_MPP

    r, g, b = thumb[..., 0], thumb[..., 1], thumb[..., 2]
    hi = np.maximum(np.maximum(r, g), b)  # (h, w) uint8: max/min in uint8 are 20x faster than in float
    lo = np.minimum(np.minimum(r, g), b)
    brightest = _UNIT[hi]  # (h, w) float32 in [0, 1]
    saturation = _saturation_table()[hi, lo]  # (max - min) / max, 0 where black: one lookup per pixel
    saturation = ndimage.uniform_filter(saturation, size=3)  # 3 x 3 mean: JPEG noise and dust
    threshold = max(otsu_threshold(saturation), min_saturation)
    mask = (saturation > threshold) & (brightest > max_darkness)

    # A structuring element wider than the mask changes nothing more (and a wrong mpp could ask for GiB).
    radius = int(min(max(h, w), max(1, round(smooth_um / px_um))))
    disk = _disk(radius)
    mask = ndimage.binary_closing(np.pad(mask, radius), structure=disk)[radius:-radius, radius:-radius]
    mask = ndimage.binary_opening(mask, structure=disk)

    px_area = px_um**2
    # Holes: background pieces (4-connected, as binary_fill_holes propagates) that do not touch the border;
    # one labelling instead of fill_holes' propagation, then the small ones are filled.
    labels, n = ndimage.label(~mask)
    if n:
        outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        small = sizes < max_hole_um2
        small[outside] = False
        small[0] = False
        mask |= small[labels]
    if mask.any():
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        keep = sizes >= min_area_um2
        keep[0] = False
        mask = keep[labels]
    return TissueMask(mask=mask, downsample=downsample, slide_dimensions=(w0, h0), threshold=float(threshold), mpp=mpp)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in ``[0, 1]``: the cut maximising between-class variance."""
    v = np.asarray(values).ravel()
    v = v[(v >= 0.0) & (v <= 1.0)]
    # np.histogram's bins over [0, 1], counted directly: bin k holds [k / bins, (k + 1) / bins), the last one
    # also 1.0 (exact for a power-of-two ``bins``, where the edges k / bins are exact binary fractions).
    index = np.minimum((v.astype(np.float64) * bins).astype(np.intp), bins - 1)
    hist = np.bincount(index, minlength=bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist / total
    w0 = np.cumsum(p)  # weight of the class below each cut
    m = np.cumsum(p * centres)
    mu_t = m[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0.0
    return float(edges[int(np.argmax(between)) + 1])


_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)  # uint8 -> [0, 1], as astype(float32) / 255


@functools.lru_cache(maxsize=1)
def _saturation_table() -> np.ndarray:
    """``(256, 256)`` float32: ``(max - min) / max`` of every (max, min) byte pair, 0 where max is 0 (black)."""
    hi, lo = _UNIT[:, None], _UNIT[None, :]
    return (hi - lo) / np.maximum(hi, np.float32(1e-6))


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx**2 + yy**2) <= radius**2


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area: positive for counter-clockwise rings (x right, y up)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
