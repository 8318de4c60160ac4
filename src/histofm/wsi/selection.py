"""Which tiles of a slide to use: detected tissue, an annotation mask, or coordinates made earlier.

One function for ``tile``, ``extract`` and ``cluster`` so the three agree:

* default: detect tissue, tile the grid, keep tiles with at least ``min_tissue`` tissue;
* ``roi``: the tissue mask is restricted to (or replaced by) a GeoJSON region
  (:class:`~histofm.wsi.roi.RoiFilter`); with ``min_tissue = 0`` tiles touching the region are kept;
* ``coords_dir``: coordinates from ``histofm tile``, TRIDENT or CLAM are reused as they are
  (no tissue detection); a ``roi`` still filters them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from histofm.errors import HistofmError
from histofm.wsi.layouts import reuse_coords
from histofm.wsi.readers import SlideReader
from histofm.wsi.roi import RoiFilter
from histofm.wsi.tiling import TileSpec, tile_slide
from histofm.wsi.tissue import TissueMask, detect_tissue


@dataclass
class TileSelection:
    """The tiles of one slide and how they were chosen.

    Attributes:
        coords: ``(N, 2)`` int64 level-0 top-left corners.
        tissue: the mask used (``None`` when coordinates were reused without a region).
        tiles_from: ``"tissue"``, ``"grid"`` (every tile) or ``"coords:<file>:sha256=..."``.
        roi: ``""`` or a description of the annotation file and classes.
    """

    coords: np.ndarray
    tissue: TissueMask | None
    tiles_from: str
    roi: str = ""


def _keep(mask: TissueMask, coords: np.ndarray, size_level0: float, min_tissue: float) -> np.ndarray:
    fractions = mask.tile_fractions(coords, size_level0)
    return fractions >= min_tissue if min_tissue > 0 else fractions > 0


def select_tiles(
    slide: SlideReader,
    spec: TileSpec,
    *,
    min_tissue: float = 0.5,
    roi: RoiFilter | None = None,
    coords_dir: str | os.PathLike[str] | None = None,
    want_tissue: bool = False,
) -> TileSelection:
    """The tiles of ``slide`` for ``spec`` (see the module docstring).

    ``want_tissue`` detects tissue even when nothing needs it (``min_tissue = 0``), for pictures.

    Raises:
        HistofmError: no tiles are left, with the flag that decides it.
    """
    name = slide.path.stem
    roi_text = roi.describe(name) if roi is not None else ""
    if coords_dir is not None:
        coords, source = reuse_coords(coords_dir, slide, spec)
        tissue = None
        if roi is not None:
            grid = detect_tissue(slide)
            region = roi.region(name, grid.mask.shape, grid.downsample)
            tissue = TissueMask(region, grid.downsample, grid.slide_dimensions, grid.threshold, grid.mpp)
            coords = coords[_keep(tissue, coords, spec.size_level0, min_tissue)]
            if len(coords) == 0:
                raise HistofmError(f"No tile of {slide.path.name} from --coords lies in the --roi region; check the classes.")
        return TileSelection(coords, tissue, source, roi_text)
    tissue = detect_tissue(slide) if (min_tissue > 0 or roi is not None or want_tissue) else None
    if roi is not None and tissue is not None:
        tissue = roi.apply(tissue, name)
        if tissue.is_empty:
            raise HistofmError(
                f"No tissue of {slide.path.name} lies inside the --roi annotations; check --roi-include / --roi-exclude "
                "or use --roi-as-tissue."
            )
    coords = tile_slide(slide, spec.target_mpp, spec.tile_size, overlap=spec.overlap, min_tissue=min_tissue,
                        tissue=tissue)
    if roi is not None and min_tissue == 0 and tissue is not None:
        coords = coords[_keep(tissue, coords, spec.size_level0, 0.0)]
        if len(coords) == 0:
            raise HistofmError(f"No tile of {slide.path.name} touches the --roi region; check the annotation classes.")
    return TileSelection(coords, tissue, "tissue" if min_tissue > 0 else "grid", roi_text)
