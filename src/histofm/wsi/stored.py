"""Direct decoding of a tiled TIFF's stored tiles, each decoded once and assembled into regions.

A whole-slide TIFF (Aperio SVS, a generic pyramidal TIFF) stores every level as a grid of
small compressed tiles, usually JPEG of 240 or 256 px. Our tiles (224 px, or 448 px read at
40x) straddle that grid, so a naive per-tile ``read_region`` decodes each stored tile several
times (a 224 px tile over 240 px stored tiles touches 3.7 of them on average) and pays the
library's RGBA compositing on top. Here the stored tiles are read with ``os.pread`` at the
offsets of the TIFF's tile table, decoded by tifffile's codec (imagecodecs' libjpeg-turbo for
JPEG, with the level's shared ``JPEGTables``), kept in a small least-recently-used cache keyed
by ``(level, tile index)``, and regions are cut out of them as ``(h, w, 3)`` uint8 arrays:
no PIL, no alpha, no colour round trip. Read in raster order, each stored tile is decoded
once per process.

Only what can be decoded exactly is taken: 8-bit RGB (or JPEG YCbCr, converted by the codec
as OpenSlide's libjpeg does), contiguous samples, a level whose size equals the reader's level.
Anything else (JPEG 2000 without a codec, palette images, 16-bit, NDPI's JPEG layout, levels
OpenSlide synthesises) returns ``None`` from :func:`open_stored_tiles`, and the backend
(OpenSlide or tiffslide) reads it as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Decoded stored tiles kept per reader (bytes): OpenSlide's default per handle, enough for random
# access (pretraining). Extraction reads rows in raster order and asks for more (see
# histofm.wsi.features): one row of 240 px stored tiles across a 100,000 px wide level is 72 MB.
DEFAULT_CACHE_BYTES = 32 * 2**20
# TIFF compressions decoded here (none, LZW, JPEG, Adobe deflate, deflate); the codec comes from tifffile.
_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})
_RGB, _YCBCR = 2, 6


class StoredTiles:
    """The stored tiles of a tiled TIFF's levels, decoded on demand and cached.

    Args:
        path: the TIFF file.
        pages: per reader level, the tifffile page holding it, or ``None`` (read by the backend).
        cache_bytes: decoded tiles kept (least recently used are dropped).
    """

    def __init__(self, path: Path, pages: Sequence[Any], cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = path
        self._levels: list[_Level | None] = [None if p is None else _Level(p) for p in pages]
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self._fd: int | None = None
        self._pid = -1
        self.decoded = 0  # stored tiles decoded so far (a test and the benchmark read it)

    def covers(self, level: int) -> bool:
        """Whether ``level`` is decoded here (otherwise the backend reads it)."""
        return 0 <= level < len(self._levels) and self._levels[level] is not None

    def read(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """The ``(h, w, 3)`` uint8 region of ``level`` at level pixel ``(x, y)``; it must lie inside the level.

        ``out``, an ``(h, w, 3)`` uint8 array, receives the pixels (a batch's slot: no extra copy).
        """
        lv = self._levels[level]
        assert lv is not None, level
        if out is None:
            out = np.empty((h, w, 3), dtype=np.uint8)
        tw, th = lv.tile_width, lv.tile_length
        for row in range(y // th, (y + h - 1) // th + 1):
            y0, y1 = max(y, row * th), min(y + h, (row + 1) * th)
            for col in range(x // tw, (x + w - 1) // tw + 1):
                x0, x1 = max(x, col * tw), min(x + w, (col + 1) * tw)
                tile = self._tile(level, lv, row * lv.columns + col)  # (th, tw, 3)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - row * th : y1 - row * th, x0 - col * tw : x1 - col * tw]
        return out

    def _tile(self, level: int, lv: _Level, index: int) -> np.ndarray:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        tile = lv.decode(self._read_bytes(lv, index), index)
        self.decoded += 1
        self._cache[key] = tile
        self._cached += tile.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return tile

    def _read_bytes(self, lv: _Level, index: int) -> bytes:
        offset, count = lv.offsets[index], lv.counts[index]
        if count == 0:
            return b""
        pid = os.getpid()
        if self._fd is None or self._pid != pid:  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), pid
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise OSError(f"tile {index} ends past the end of the file")
        return data

    def close(self) -> None:
        """Drop the cache and the file descriptor."""
        self._cache.clear()
        self._cached = 0
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


class _Level:
    """One tiled page: its tile table, JPEG tables and codec."""

    def __init__(self, page: Any) -> None:  # noqa: ANN401
        self.tile_width, self.tile_length = int(page.tilewidth), int(page.tilelength)
        self.columns = -(-int(page.imagewidth) // self.tile_width)
        self.offsets = tuple(int(v) for v in page.dataoffsets)
        self.counts = tuple(int(v) for v in page.databytecounts)
        self.tables = page.jpegtables
        self._decode = page.decode  # tifffile's codec for this page (imagecodecs underneath)

    def decode(self, data: bytes, index: int) -> np.ndarray:
        """``(tile_length, tile_width, 3)`` uint8; an empty tile is white (OpenSlide: transparent, on white)."""
        if not data:
            return np.full((self.tile_length, self.tile_width, 3), 255, dtype=np.uint8)
        array, _, _ = self._decode(data, index, jpegtables=self.tables)  # (1, 1, th, tw, 3)
        array = np.asarray(array).reshape(self.tile_length, self.tile_width, -1)
        return array if array.shape[2] == 3 else np.ascontiguousarray(array[..., :3])


def open_stored_tiles(
    path: Path, level_dimensions: Sequence[tuple[int, int]], cache_bytes: int = DEFAULT_CACHE_BYTES
) -> StoredTiles | None:
    """Direct decoding for the levels of ``path`` that allow it, or ``None`` when none does.

    Args:
        path: a slide file (non-TIFF files give ``None``).
        level_dimensions: the reader's ``(width, height)`` of each level; a level is matched
            to the first tiled page (or SubIFD) of exactly that size.
        cache_bytes: decoded tiles kept per process.
    """
    try:
        import imagecodecs  # noqa: F401  (tifffile's codecs; without it tifffile decodes nothing compressed)
        import tifffile
    except ImportError:
        return None
    try:
        with _quiet():
            tif = tifffile.TiffFile(path)
    except Exception:  # not a TIFF, or one tifffile cannot parse: the backend reads it
        return None
    try:
        if tif.is_ndpi or tif.is_scn or tif.is_philips or tif.is_bif:  # layouts OpenSlide reads its own way
            return None
        candidates = list(_tiled_pages(tif))
        pages = []
        for dims in level_dimensions:
            page = next((p for p in candidates if (int(p.imagewidth), int(p.imagelength)) == tuple(dims)), None)
            pages.append(page if page is not None and _decodable(page) else None)
        if all(p is None for p in pages):
            return None
        stored = StoredTiles(path, pages, cache_bytes)
    except Exception:  # an odd tag layout: leave the file to the backend
        return None
    finally:
        tif.close()
    return stored


def _tiled_pages(tif: Any) -> Any:  # noqa: ANN401
    """Every tiled page and SubIFD of the file, in file order."""
    import tifffile

    for page in tif.pages:
        if not isinstance(page, tifffile.TiffPage):
            continue
        yield page
        for sub in page.pages or ():
            if isinstance(sub, tifffile.TiffPage):
                yield sub


def _decodable(page: Any) -> bool:  # noqa: ANN401
    """8-bit RGB tiles, contiguous samples, a codec we trust to match OpenSlide's pixels."""
    if not page.is_tiled or page.imagedepth != 1 or page.tiledepth != 1:
        return False
    if page.bitspersample != 8 or page.planarconfig != 1 or page.samplesperpixel not in (3, 4):
        return False
    if page.samplesperpixel == 4 and page.extrasamples:  # RGBA: alpha compositing belongs to the backend
        return False
    compression = int(page.compression)
    if compression not in _COMPRESSIONS:
        return False
    photometric = int(page.photometric)
    if photometric == _YCBCR and compression != 7:  # raw subsampled YCbCr: left to libtiff
        return False
    if photometric not in (_RGB, _YCBCR):
        return False
    count = len(page.dataoffsets)
    columns = -(-int(page.imagewidth) // int(page.tilewidth))
    rows = -(-int(page.imagelength) // int(page.tilelength))
    return count == columns * rows == len(page.databytecounts)


@contextlib.contextmanager
def _quiet() -> Any:  # noqa: ANN401
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
