"""Tiling: a regular grid of square tiles at a target resolution, kept where there is tissue.

A tile is ``tile_size`` pixels at ``target_mpp`` microns per pixel, so it covers
``tile_size * target_mpp / mpp`` level-0 pixels. Tiles step by ``tile_size - overlap``
(at the target resolution), start at the slide's top-left corner, and only whole tiles
inside the slide are made. Coordinates are level-0 pixels of each tile's top-left corner,
in row-major order (``y`` then ``x``), as int64: the same grid for the same inputs,
every time.

Coordinates are saved as HDF5 (``coords`` dataset with TRIDENT's attributes
``patch_size``, ``patch_size_level0``, ``target_magnification`` ... plus ours) or as CSV.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from histofm.checks import check_alloc
from histofm.errors import HistofmError
from histofm.utils import atomic_path
from histofm.wsi.readers import SlideReader
from histofm.wsi.tissue import TissueMask, detect_tissue

# Peak bytes per grid tile while the grid is made and filtered (int64 x, y and their copies).
_GRID_BYTES_PER_TILE = 64


@dataclass(frozen=True)
class TileSpec:
    """Where and how tiles of one slide are read.

    Attributes:
        target_mpp: microns per pixel of the tiles.
        tile_size: tile side in pixels at ``target_mpp``.
        overlap: pixels shared by neighbouring tiles, at ``target_mpp``.
        level: slide level read (then resized to ``tile_size``).
        read_size: pixels read at ``level`` per tile side.
        size_level0: tile side in level-0 pixels (fractional).
        stride_level0: grid step in level-0 pixels (fractional).
        level0_mpp: microns per pixel of level 0.
    """

    target_mpp: float
    tile_size: int
    overlap: int
    level: int
    read_size: int
    size_level0: float
    stride_level0: float
    level0_mpp: float

    def attrs(self) -> dict[str, Any]:
        """``coords`` attributes: TRIDENT's meaning (``patch_size`` at the target resolution) plus ours.

        CLAM reads ``patch_size`` pixels at ``patch_level``, a different meaning when
        ``read_size != tile_size``; ``histofm extract --layout clam`` writes CLAM's own
        attributes (see :mod:`histofm.wsi.layouts`).
        """
        return {
            "patch_size": self.tile_size,  # TRIDENT: side at the target magnification
            "patch_size_level0": round(self.size_level0),  # TRIDENT
            "level0_magnification": round(10.0 / self.level0_mpp, 3),  # TRIDENT; 0.25 um/px ~ 40x
            "target_magnification": round(10.0 / self.target_mpp, 3),  # TRIDENT
            "overlap": self.overlap,
            "mpp": self.target_mpp,
            "level0_mpp": self.level0_mpp,
            "level": self.level,
            "read_size": self.read_size,
        }


def tile_spec(slide: SlideReader, target_mpp: float = 0.5, tile_size: int = 224, overlap: int = 0) -> TileSpec:
    """The :class:`TileSpec` of ``slide`` for tiles of ``tile_size`` pixels at ``target_mpp``."""
    if tile_size < 1:
        raise HistofmError(f"The tile size must be a positive number of pixels, not {tile_size}.")
    if not 0 <= overlap < tile_size:
        raise HistofmError(f"The overlap must be at least 0 and smaller than the tile size ({tile_size}), not {overlap}.")
    level, read_size, size0 = slide.tile_geometry(target_mpp, tile_size)
    stride0 = (tile_size - overlap) * target_mpp / slide.mpp
    # The grid's coordinates (and their copies while selecting) before any is made: an
    # extreme --target-mpp or --mpp-override would ask for GiB to TiB.
    w0, h0 = slide.dimensions
    tiles = (max(0.0, w0 - size0) / stride0 + 1) * (max(0.0, h0 - size0) / stride0 + 1)
    check_alloc(tiles * _GRID_BYTES_PER_TILE, f"The tile grid of {slide.path.name} ({tiles:.3g} tiles)",
                "--target-mpp, --tile-size or --mpp-override")
    return TileSpec(
        target_mpp=float(target_mpp),
        tile_size=int(tile_size),
        overlap=int(overlap),
        level=level,
        read_size=read_size,
        size_level0=size0,
        stride_level0=stride0,
        level0_mpp=slide.mpp,
    )


def grid_coords(dimensions: tuple[int, int], size_level0: float, stride_level0: float) -> np.ndarray:
    """All whole-tile top-left corners ``(N, 2)`` int64 of a grid over ``dimensions`` (row-major)."""
    w0, h0 = dimensions
    nx = math.floor((w0 - size_level0) / stride_level0 + 1e-9) + 1 if w0 >= size_level0 else 0
    ny = math.floor((h0 - size_level0) / stride_level0 + 1e-9) + 1 if h0 >= size_level0 else 0
    xs = np.round(np.arange(nx) * stride_level0).astype(np.int64)
    ys = np.round(np.arange(ny) * stride_level0).astype(np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64)  # (ny * nx, 2)


def tile_slide(
    slide: SlideReader,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    *,
    overlap: int = 0,
    min_tissue: float = 0.5,
    tissue: TissueMask | None = None,
) -> np.ndarray:
    """Level-0 top-left corners ``(N, 2)`` (int64, ``x, y``) of the tissue tiles of ``slide``.

    Args:
        slide: an open slide (its mpp must be known or overridden).
        target_mpp: microns per pixel of the tiles.
        tile_size: tile side in pixels at ``target_mpp``.
        overlap: pixels shared by neighbouring tiles at ``target_mpp``.
        min_tissue: keep tiles whose tissue fraction is at least this (0 keeps every tile).
        tissue: a precomputed mask; detected with default settings when omitted.

    Raises:
        HistofmError: the slide is smaller than one tile, has no tissue, or no tile
            reaches ``min_tissue``.
    """
    if not 0.0 <= min_tissue <= 1.0:
        raise HistofmError(f"The minimum tissue fraction must lie between 0 and 1, not {min_tissue}.")
    spec = tile_spec(slide, target_mpp, tile_size, overlap)
    coords = grid_coords(slide.dimensions, spec.size_level0, spec.stride_level0)
    if len(coords) == 0:
        w0, h0 = slide.dimensions
        scale = slide.mpp / target_mpp
        raise HistofmError(
            f"{slide.path.name} is {round(w0 * scale)} x {round(h0 * scale)} px at {target_mpp:g} um/px, "
            f"smaller than one {tile_size} px tile; use a smaller tile size or a finer target mpp."
        )
    if min_tissue == 0.0:
        return coords
    if tissue is None:
        tissue = detect_tissue(slide)
    if tissue.is_empty:
        raise HistofmError(
            f"No tissue found in {slide.path.name} (the thumbnail looks like blank glass); check the slide, "
            "or pass --min-tissue 0 to tile it anyway."
        )
    keep = tissue.tile_fractions(coords, spec.size_level0) >= min_tissue
    if not keep.any():
        raise HistofmError(
            f"No tile of {slide.path.name} has at least {min_tissue:.0%} tissue; "
            "lower --min-tissue or use smaller tiles."
        )
    return coords[keep]


def save_coords(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    spec: TileSpec,
    *,
    name: str = "",
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write tile coordinates as HDF5 (TRIDENT-style ``coords`` attributes) or CSV, by extension, atomically."""
    path = Path(path)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if path.suffix.lower() == ".csv":
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["x", "y"])
            writer.writerows(coords.tolist())
        return path
    if path.suffix.lower() not in {".h5", ".hdf5"}:
        raise HistofmError(f"Cannot write coordinates to {path.name}: use a .h5 or .csv file name.")
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            dset = f.create_dataset("coords", data=coords)
            for key, value in {**spec.attrs(), "name": name, **(extra_attrs or {})}.items():
                dset.attrs[key] = value
            for key, value in asdict(spec).items():
                f.attrs[key] = value
    return path


def read_coords(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinates ``(N, 2)`` and attributes from a file written by :func:`save_coords` (or CLAM / TRIDENT)."""
    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"Coordinates file not found: {path}; run `histofm tile` first.")
    if path.suffix.lower() == ".csv":
        data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
        return data.reshape(-1, 2), {}
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["coords"][:], dtype=np.int64), dict(f["coords"].attrs)
    except (OSError, KeyError) as e:
        raise HistofmError(f"{path.name} is not a coordinates file with a 'coords' dataset ({e}).") from None


def draw_tiles(
    slide: SlideReader,
    coords: np.ndarray,
    size_level0: float,
    *,
    tissue: TissueMask | None = None,
    max_size: int = 1024,
    title: str | None = None,
) -> Image.Image:
    """A thumbnail with the tissue mask outlined in green (lightly tinted) and each tile outlined in blue."""
    thumb = slide.thumbnail(max_size).convert("RGB")
    w0, h0 = slide.dimensions
    sx, sy = thumb.width / w0, thumb.height / h0
    if tissue is not None and not tissue.is_empty:
        from scipy import ndimage

        mask = np.asarray(tissue.to_image().resize(thumb.size, Image.Resampling.NEAREST)) > 0  # (h, w)
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        pixels = np.asarray(thumb).copy()
        pixels[mask] = (0.85 * pixels[mask] + 0.15 * np.array([0, 200, 0])).astype(np.uint8)
        pixels[edge] = (0, 170, 0)
        thumb = Image.fromarray(pixels)
    draw = ImageDraw.Draw(thumb)
    for x, y in np.asarray(coords).reshape(-1, 2):
        draw.rectangle(
            [x * sx, y * sy, (x + size_level0) * sx - 1, (y + size_level0) * sy - 1], outline=(20, 60, 220), width=1
        )
    if title:
        draw.rectangle([0, 0, min(thumb.width, 8 + 6 * len(title)), 14], fill=(0, 0, 0))
        draw.text((4, 2), title, fill=(255, 255, 255))
    return thumb


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save a PIL image as PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
