"""The whole-slide pipeline: read slides, find tissue, tile, extract features to HDF5.

>>> from histofm.wsi import open_slide, detect_tissue, tile_slide
>>> slide = open_slide("slide.svs")                          # doctest: +SKIP
>>> coords = tile_slide(slide, target_mpp=0.5, tile_size=224)  # doctest: +SKIP

See ``docs/wsi.md`` for the conventions (coordinates, mpp, file layout).
"""

from histofm.wsi.readers import ImageReader, OpenSlideReader, SlideReader, TiffSlideReader, open_slide
from histofm.wsi.roi import RoiFilter, read_annotations
from histofm.wsi.selection import TileSelection, select_tiles
from histofm.wsi.slides import SlideInput, resolve_slides
from histofm.wsi.tiling import (
    TileSpec,
    draw_tiles,
    grid_coords,
    read_coords,
    save_coords,
    tile_slide,
    tile_spec,
)
from histofm.wsi.tissue import TissueMask, detect_tissue, otsu_threshold

__all__ = [
    "ImageReader",
    "OpenSlideReader",
    "RoiFilter",
    "SlideInput",
    "SlideReader",
    "TiffSlideReader",
    "TileSelection",
    "TileSpec",
    "TissueMask",
    "detect_tissue",
    "draw_tiles",
    "grid_coords",
    "open_slide",
    "otsu_threshold",
    "read_annotations",
    "read_coords",
    "resolve_slides",
    "save_coords",
    "select_tiles",
    "tile_slide",
    "tile_spec",
]
