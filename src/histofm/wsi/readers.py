"""Slide readers: one protocol, three backends (OpenSlide, tiffslide, plain images).

Every reader exposes the same small surface, in OpenSlide's conventions:

* ``dimensions`` ``(width, height)`` of level 0, ``level_count``, ``level_dimensions``
  and ``level_downsamples`` (level-0 pixels per level pixel);
* ``mpp``: microns per pixel of level 0, from the file's metadata or from an override
  (``open_slide(path, mpp=0.5)``, ``--mpp-override`` on the command line); a slide without
  it raises :class:`HistofmError` saying so, only when a physical resolution is needed;
* ``read_region((x, y), level, (w, h))``: an RGB ``PIL.Image``, with ``(x, y)`` in level-0
  pixels (OpenSlide's convention); area outside the slide is white;
* ``read_region_mpp(x, y, size, target_mpp)``: a ``size x size`` RGB tile at a physical
  resolution: the coarsest level that is not coarser than ``target_mpp`` is read, then
  resized (skipped when the sizes already agree);
* ``thumbnail(max_size)``: the whole slide with its longer side at most ``max_size``.

Backends: ``openslide`` (openslide-python + the openslide-bin wheel: Aperio, Hamamatsu,
MIRAX, Philips, generic tiled TIFF, DICOM ...), ``tiffslide`` (pure Python, TIFF-based
formats, SubIFD pyramids) and ``image`` (PNG / JPEG / plain TIFF loaded whole as a
one-level slide). ``open_slide(path, backend="auto")`` tries them in that order. Where
OpenSlide cannot be imported (no wheel of its C library for the platform), ``auto`` reads
with tiffslide and says so once per process on stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import math
import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from histofm.errors import HistofmError
from histofm.wsi.stored import StoredTiles, open_stored_tiles

# Extensions read as plain images first (OpenSlide would only wrap them anyway).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
BACKENDS = ("openslide", "tiffslide", "image")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# File signatures named in "cannot read" messages (a known start means a damaged file, not a wrong one).
_MAGIC_KINDS = (
    *((m, "TIFF/SVS slide") for m in _TIFF_MAGIC),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
)
# A resolution read from image metadata is trusted only inside this range (um/px):
# 72 or 96 dpi defaults of ordinary pictures (353 / 265 um/px) are not microscopy.
_PLAUSIBLE_MPP = (0.02, 50.0)
# A level may be up to 1% finer than asked before the next finer one is preferred,
# so 0.499 um/px slides serve 0.5 um/px tiles without resampling.
_LEVEL_TOLERANCE = 0.01
# Thumbnails of levels larger than this are assembled band by band (bounded memory).
_THUMBNAIL_BAND_PIXELS = 16_000_000
# A slide side longer than this (about 1 m at 0.25 um/px) can only come from a corrupt header;
# reading such a file would try to allocate petabytes or loop over billions of empty tiles.
_MAX_SIDE = 2**22
# At most this many TIFF pages (and SubIFDs of each) have their tile tables checked on opening.
_MAX_CHECKED_PAGES = 64
# Longest library message quoted inside one of our sentences.
_MAX_REASON = 160
# Whether this process has said that OpenSlide is missing and tiffslide reads instead.
_fallback_noticed = False


class _BackendUnavailable(Exception):
    """A backend's library cannot be imported on this platform (raised before any file is read)."""

    def __init__(self, backend: str, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {' '.join(str(error).split())[:_MAX_REASON]}")
        self.backend = backend


def _import_backend(backend: str, module: str) -> Any:  # noqa: ANN401
    """Import a backend's library; ImportError, or OSError from a missing shared library, becomes
    :class:`_BackendUnavailable`."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as e:
        raise _BackendUnavailable(backend, e) from None


class SlideReader(ABC):
    """Common interface of every backend; use :func:`open_slide` to get one.

    Args:
        path: the slide file.
        mpp: microns per pixel of level 0; overrides the file's metadata.
    """

    backend: ClassVar[str] = ""

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        self.path = Path(path)
        self.name = self.path.stem
        if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
            raise HistofmError(f"The mpp override must be a positive number of microns per pixel, not {mpp!r}.")
        self._mpp_override = mpp
        self.dimensions: tuple[int, int] = (0, 0)
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        # Direct decoding of the file's stored tiles (histofm.wsi.stored), set by open_slide where it applies.
        self._stored: StoredTiles | None = None

    # ---- backend hooks -------------------------------------------------------------------------
    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read an in-bounds region as an RGB ``(h, w, 3)`` uint8 array (backend-specific)."""

    @abstractmethod
    def _metadata_mpp(self) -> float | None:
        """Level-0 microns per pixel from the file's metadata, or ``None``."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    # ---- shared behaviour ------------------------------------------------------------------------
    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g}" if self.has_mpp else "unknown"
        return (
            f"{type(self).__name__}({self.path.name!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={mpp})"
        )

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def has_mpp(self) -> bool:
        """Whether a resolution is known (override or metadata)."""
        return self._mpp_override is not None or self._metadata_mpp() is not None

    @property
    def mpp(self) -> float:
        """Microns per pixel of level 0 (the override wins over the file's metadata)."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        value = self._metadata_mpp()
        if value is None:
            raise HistofmError(
                f"{self.path.name} records no microns-per-pixel resolution; pass its level-0 resolution "
                "with --mpp-override (mpp=... in Python), e.g. --mpp-override 0.25 for 40x or 0.5 for 20x."
            )
        return value

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of ``level``."""
        return self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1% tolerance)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + _LEVEL_TOLERANCE) and ds >= self.level_downsamples[best]:
                best = level
        return best

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The level to read for tiles at ``target_mpp`` microns per pixel."""
        return self.best_level_for_downsample(self._target_downsample(target_mpp))

    def _target_downsample(self, target_mpp: float) -> float:
        if not (target_mpp > 0 and math.isfinite(target_mpp)):
            raise HistofmError(f"The target resolution must be a positive number of microns per pixel, not {target_mpp!r}.")
        return target_mpp / self.mpp

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """An RGB region of ``size`` pixels of ``level`` whose top-left is ``location`` at level 0.

        Parts outside the slide are white, so edge tiles keep their size.
        """
        return Image.fromarray(self.read_region_array(location, level, size))

    def read_region_array(
        self, location: tuple[int, int], level: int, size: tuple[int, int], out: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`read_region` as a ``(h, w, 3)`` uint8 array (no PIL round trip).

        ``out``, an ``(h, w, 3)`` uint8 array (a slot of a batch), receives the pixels and is returned.
        """
        if not 0 <= level < self.level_count:
            raise HistofmError(f"{self.path.name} has levels 0..{self.level_count - 1}, not {level}.")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise HistofmError(f"A region must have a positive size, not {w} x {h}.")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # Region in this level's pixel grid, clipped to the level.
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + w, lw), min(ly + h, lh)
        if cx0 == lx and cy0 == ly and cx1 == lx + w and cy1 == ly + h:
            return self._safe_read((x, y), level, (w, h), out=out)
        canvas = np.full((h, w, 3), 255, dtype=np.uint8) if out is None else out
        if out is not None:
            canvas.fill(255)
        if cx1 > cx0 and cy1 > cy0:
            # Level-0 origin of the visible part: keep the caller's sub-level offset where in bounds.
            ox = x if cx0 == lx else round(cx0 * ds)
            oy = y if cy0 == ly else round(cy0 * ds)
            part = self._safe_read((ox, oy), level, (cx1 - cx0, cy1 - cy0))
            canvas[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = part
        return canvas

    @property
    def tile_cache_bytes(self) -> int:
        """Bytes of decoded stored tiles this reader keeps (0 without direct decoding)."""
        return self._stored.cache_bytes if self._stored is not None else 0

    @tile_cache_bytes.setter
    def tile_cache_bytes(self, value: int) -> None:
        if self._stored is not None:
            self._stored.cache_bytes = max(0, int(value))

    def decoder(self, level: int) -> str:
        """Who decodes ``level``: ``"stored-tiles"`` (direct, :mod:`histofm.wsi.stored`) or the backend's name."""
        return "stored-tiles" if self._stored is not None and self._stored.covers(level) else self.backend

    def _direct(
        self, location: tuple[int, int], level: int, size: tuple[int, int], out: np.ndarray | None = None
    ) -> np.ndarray | None:
        """The region from the stored tiles, or ``None`` where the backend must read it.

        Only at whole pixels of the level: at a fractional position OpenSlide interpolates
        (a sub-pixel shift), which only the backend reproduces.
        """
        if self._stored is None or not self._stored.covers(level):
            return None
        ds = self.level_downsamples[level]
        fx, fy = location[0] / ds, location[1] / ds
        lx, ly = round(fx), round(fy)
        if abs(fx - lx) > 1e-9 * max(1.0, fx) or abs(fy - ly) > 1e-9 * max(1.0, fy):
            return None
        return self._stored.read(level, lx, ly, size[0], size[1], out=out)

    def _safe_read(
        self, location: tuple[int, int], level: int, size: tuple[int, int], level_xy: tuple[int, int] | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The region read by the stored tiles or the backend, errors in one sentence; ``level_xy``
        (stored-tile levels only) gives the origin in the level's own pixels, taken exactly; ``out``
        receives the pixels."""
        try:
            if level_xy is not None and self._stored is not None:
                array = self._stored.read(level, level_xy[0], level_xy[1], size[0], size[1], out=out)
            else:
                array = self._direct(location, level, size, out=out)
            if array is None:
                array = self._read(location, level, size)
        except HistofmError:
            raise
        except MemoryError:
            raise HistofmError(
                f"Reading {self.path.name} at {location} (level {level}, {size[0]} x {size[1]} pixels) needs more "
                "memory than is available; read smaller regions or a coarser level."
            ) from None
        except Exception as e:  # backend errors carry no hint of what to do
            raise HistofmError(
                f"Reading {self.path.name} at {location} (level {level}) failed ({_reason(e)}); "
                "the file is probably truncated or corrupt, so copy or export it again."
            ) from None
        if array.shape != (size[1], size[0], 3):  # a backend that returned less than asked
            canvas = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
            hh, ww = min(size[1], array.shape[0]), min(size[0], array.shape[1])
            canvas[:hh, :ww] = array[:hh, :ww, :3]
            array = canvas
        if out is not None and array is not out:  # the backend read it: into the caller's slot
            out[...] = array
            return out
        return array

    def tile_geometry(self, target_mpp: float, size: int) -> tuple[int, int, float]:
        """``(level, read_size, size_level0)`` for ``size``-pixel tiles at ``target_mpp``.

        ``read_size`` pixels are read at ``level`` and resized to ``size``;
        ``size_level0`` is the tile's (fractional) side in level-0 pixels.
        """
        target_ds = self._target_downsample(target_mpp)
        level = self.best_level_for_downsample(target_ds)
        read_size = max(1, round(size * target_ds / self.level_downsamples[level]))
        return level, read_size, size * target_ds

    def read_region_mpp(
        self, x: int, y: int, size: int, target_mpp: float, *, resample: int = Image.Resampling.BILINEAR
    ) -> Image.Image:
        """A ``size x size`` RGB tile at ``target_mpp`` whose top-left is ``(x, y)`` at level 0."""
        level, read_size, _ = self.tile_geometry(target_mpp, size)
        tile = self.read_region((x, y), level, (read_size, read_size))
        if read_size != size:
            tile = tile.resize((size, size), resample)
        return tile

    def thumbnail(self, max_size: int = 1024) -> Image.Image:
        """The whole slide as RGB with its longer side at most ``max_size`` pixels."""
        w0, h0 = self.dimensions
        scale = min(1.0, max_size / max(w0, h0))
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        # The coarsest level that is still at least as large as the thumbnail.
        level = self.best_level_for_downsample(max(w0 / tw, h0 / th))
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        if lw * lh <= _THUMBNAIL_BAND_PIXELS:
            image = self.read_region((0, 0), level, (lw, lh))
            return image if (lw, lh) == (tw, th) else image.resize((tw, th), Image.Resampling.BOX)
        # A large level (a slide without a pyramid): read horizontal bands that each map to whole
        # thumbnail rows, so memory stays bounded and the result matches a one-piece resize.
        rows_per_band = max(1, int(_THUMBNAIL_BAND_PIXELS / (lw * lh / th)))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        exact = self._stored is not None and self._stored.covers(level)
        for r0 in range(0, th, rows_per_band):
            r1 = min(th, r0 + rows_per_band)
            y0, y1 = round(r0 * lh / th), round(r1 * lh / th)
            if exact:  # the level's rows y0..y1 themselves (a backend interpolates between rows)
                rows = max(1, min(y1, lh) - y0)
                band = Image.fromarray(self._safe_read((0, round(y0 * ds)), level, (lw, rows), level_xy=(0, y0)))
            else:
                band = self.read_region((0, round(y0 * ds)), level, (lw, max(1, y1 - y0)))
            out[r0:r1] = np.asarray(band.resize((tw, r1 - r0), Image.Resampling.BOX))
        return Image.fromarray(out)


class OpenSlideReader(SlideReader):
    """OpenSlide through ``openslide-python`` and the ``openslide-bin`` wheel."""

    backend = "openslide"

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        openslide = _import_backend("openslide", "openslide")
        self._slide = openslide.OpenSlide(str(self.path))
        self.dimensions = tuple(self._slide.dimensions)
        self.level_dimensions = tuple(tuple(d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties: dict[str, str] = dict(self._slide.properties)

    def _metadata_mpp(self) -> float | None:
        return _parse_mpp(self.properties.get("openslide.mpp-x"))

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # RGBA (not premultiplied), alpha 0 where nothing was scanned: composite on white.
        region = self._slide.read_region(location, level, size)
        w, h = region.size
        # PIL's raw packers are the cheapest way out of PIL (np.asarray and convert cost more
        # than 10% of a tile's decoding time).
        if np.frombuffer(region.tobytes("raw", "A"), np.uint8).min() == 255:  # the usual case
            return np.frombuffer(bytearray(region.tobytes("raw", "RGB")), np.uint8).reshape(h, w, 3)
        return _to_rgb(np.frombuffer(region.tobytes(), np.uint8).reshape(h, w, 4))

    def close(self) -> None:
        _close_stored(self)
        self._slide.close()


class TiffSlideReader(SlideReader):
    """tiffslide: a pure-Python reader of TIFF-based slides (SVS, generic pyramidal TIFF)."""

    backend = "tiffslide"

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        tiffslide = _import_backend("tiffslide", "tiffslide")
        self._slide = tiffslide.TiffSlide(str(self.path))
        self.dimensions = tuple(int(v) for v in self._slide.dimensions)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties: dict[str, Any] = dict(self._slide.properties)

    def _metadata_mpp(self) -> float | None:
        return _parse_mpp(self.properties.get("tiffslide.mpp-x"))

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        array = self._slide.read_region(location, level, size, as_array=True)  # (h, w, C)
        return _to_rgb(np.asarray(array))

    def close(self) -> None:
        _close_stored(self)
        self._slide.close()


class ImageReader(SlideReader):
    """A PNG / JPEG / plain TIFF held in memory as a one-level slide.

    The resolution comes from TIFF resolution tags when they look like microscopy
    (PNG and JPEG "dpi" fields are ignored: they are almost always 72 or 96); pass
    ``mpp`` otherwise.
    """

    backend = "image"

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        self._tag_mpp: float | None = None
        too_large = HistofmError(
            f"{self.path.name} is too large to load whole as a plain image; convert it to a "
            "tiled pyramidal TIFF (for example `vips tiffsave in out.tif --tile --pyramid`)."
        )
        if self.path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages[0]
                # Check the declared size before tifffile allocates it (Pillow's limit for the same case).
                pixels = page.imagewidth * page.imagelength * max(1, page.imagedepth)
                if Image.MAX_IMAGE_PIXELS is not None and pixels > 2 * Image.MAX_IMAGE_PIXELS:
                    raise too_large
                self._tag_mpp = _tiff_tag_mpp(page)
                array = page.asarray()
        else:
            try:
                with Image.open(self.path) as im:
                    im.load()
                    array = np.asarray(im.convert("RGB"))
            except Image.DecompressionBombError:
                raise too_large from None
        self._array = _to_rgb(np.asarray(array))  # (H, W, 3) uint8
        h, w = self._array.shape[:2]
        self.dimensions = (w, h)
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)

    def _metadata_mpp(self) -> float | None:
        return self._tag_mpp

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = location
        w, h = size
        return self._array[y : y + h, x : x + w].copy()

    def close(self) -> None:
        self._array = np.zeros((0, 0, 3), np.uint8)


_READERS: dict[str, type[SlideReader]] = {
    "openslide": OpenSlideReader,
    "tiffslide": TiffSlideReader,
    "image": ImageReader,
}


_LIBRARY = {"openslide": "OpenSlide", "tiffslide": "tiffslide", "image": "Pillow"}


def open_slide(
    path: str | os.PathLike[str], mpp: float | None = None, backend: str = "auto", *, direct: bool = True
) -> SlideReader:
    """Open a whole-slide image or a plain image as a :class:`SlideReader`.

    Args:
        path: the slide (``.svs``, ``.ndpi``, ``.tif`` ...) or image (``.png``, ``.jpg``).
        mpp: level-0 microns per pixel; overrides the file's metadata (needed for
            images that record none).
        backend: ``"auto"`` (OpenSlide, then tiffslide, then Pillow/tifffile; plain
            image extensions go straight to Pillow), or one of ``"openslide"``,
            ``"tiffslide"``, ``"image"``.
        direct: decode the stored tiles of tiled TIFF levels directly (:mod:`histofm.wsi.stored`:
            the same pixels, each stored tile decoded once); the backend still reads every
            level or format that does not allow it.

    Raises:
        HistofmError: missing, empty, unreadable, truncated or corrupt file, unknown backend.
    """
    path = Path(path)
    if backend != "auto" and backend not in _READERS:
        raise HistofmError(f"Unknown slide backend {backend!r}; choose auto, {', '.join(BACKENDS)}.")
    if not path.exists():
        raise HistofmError(f"Slide file not found: {path}; check the path.")
    if path.is_file() and path.stat().st_size == 0:
        raise HistofmError(f"Slide file {path} is empty (0 bytes); copy it again.")
    if backend != "auto":
        order = [backend]
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        order = ["image"]
    else:
        order = list(BACKENDS)
    if path.is_file() and _head(path) in _TIFF_MAGIC:
        _check_tiff_tables(path)
    errors: list[BaseException] = []
    for name in order:
        try:
            with _quiet("tifffile", "tiffslide"):
                reader = _READERS[name](path, mpp)
        except HistofmError:
            raise
        except _BackendUnavailable as e:
            if backend != "auto":
                raise HistofmError(
                    f"The {_LIBRARY[name]} backend cannot be imported on this platform ({e}); install it "
                    f"({_INSTALL[name]}) or pass --backend auto to try the other readers."
                ) from None
            if name == "openslide":
                _notice_openslide_fallback(e)
            errors.append(e)
            continue
        except MemoryError:  # a header that declares more than any real slide holds
            raise HistofmError(
                f"Opening {path.name} with {_library(name, path)} needs more memory than is available, so its "
                "header is probably corrupt; copy or export it again."
            ) from None
        except Exception as e:  # each library raises its own types; try the next one
            errors.append(e)
            continue
        if min(reader.dimensions) <= 0:
            reader.close()
            continue
        try:
            _check_geometry(reader)
        except HistofmError:
            reader.close()
            raise
        if direct and name in ("openslide", "tiffslide"):
            reader._stored = open_stored_tiles(path, reader.level_dimensions)
        return reader
    raise HistofmError(_unreadable_message(path, order, errors))


_INSTALL = {"openslide": "pip install openslide-python openslide-bin", "tiffslide": "pip install tiffslide",
            "image": "pip install pillow tifffile"}


def _notice_openslide_fallback(error: _BackendUnavailable) -> None:
    """Say once per process that slides are read with tiffslide because OpenSlide is missing."""
    global _fallback_noticed
    if not _fallback_noticed:
        _fallback_noticed = True
        print(f"histofm: note: OpenSlide cannot be imported ({error}); reading slides with tiffslide instead "
              f"({_INSTALL['openslide']} to restore it).", file=sys.stderr)


def _close_stored(reader: SlideReader) -> None:
    if reader._stored is not None:
        reader._stored.close()
        reader._stored = None


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _check_geometry(reader: SlideReader) -> None:
    """Refuse levels whose size or downsample no real slide has (a corrupt header)."""
    for (w, h), ds in zip(reader.level_dimensions, reader.level_downsamples):
        if not (0 < w <= _MAX_SIDE and 0 < h <= _MAX_SIDE and math.isfinite(ds) and ds > 0):
            raise HistofmError(
                f"{reader.path.name} declares a level of {w} x {h} pixels (downsample {ds:g}), which no real slide "
                "has, so its header is probably corrupt; copy or export it again."
            )


def _check_tiff_tables(path: Path) -> None:
    """Refuse a TIFF whose tile or strip table is shorter than its declared image needs.

    libtiff and tifffile read the missing entries as empty tiles, so a flipped width or height
    turns a small file into a huge blank slide whose thumbnail takes hours (or whose whole-image
    load allocates gigabytes). Files tifffile cannot parse are left to the backends to judge.
    """
    import tifffile

    try:
        with _quiet("tifffile"), tifffile.TiffFile(path) as tif:
            if tif.is_ndpi:  # tifffile rewrites NDPI's JPEG layout; its tables are not TIFF's
                return
            for i, page in enumerate(tif.pages):
                if i >= _MAX_CHECKED_PAGES:
                    break
                subs = page.pages if isinstance(page, tifffile.TiffPage) else None
                for p in [page, *itertools.islice(subs or (), _MAX_CHECKED_PAGES)]:
                    if not isinstance(p, tifffile.TiffPage) or not p.shape:
                        continue
                    needed, listed = math.prod(p.chunked), len(p.dataoffsets)
                    if listed < needed:
                        raise HistofmError(
                            f"{path.name} declares a {p.imagewidth} x {p.imagelength} pixel image of {needed} tiles or "
                            f"strips but lists only {listed}, so it is probably truncated or corrupt; copy or export "
                            "it again."
                        )
    except HistofmError:
        raise
    except Exception:  # unparseable here: the backends give the error
        return


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence library loggers and warnings while probing a file (they would precede our one sentence)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _library(backend: str, path: Path) -> str:
    if backend == "image" and path.suffix.lower() in {".tif", ".tiff"}:
        return "tifffile"
    return _LIBRARY[backend]


def _reason(e: BaseException) -> str:
    """A library's exception as a short single-line quote."""
    if isinstance(e, Image.UnidentifiedImageError):  # its text only repeats the file's path
        return "not a format Pillow knows"
    text = " ".join(str(e).split())
    text = text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3].rstrip() + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _unreadable_message(path: Path, tried: list[str], errors: Sequence[BaseException] = ()) -> str:
    if path.is_dir():
        return f"{path} is a folder, not a slide file; give the slide file itself (for DICOM, one .dcm of the slide)."
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"Cannot read {path} ({e}); check the file's permissions."
    names = [_library(name, path) for name in tried]
    readers = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    # With one reader tried, its own words say what is wrong (e.g. "image file is truncated").
    why = f" ({_reason(errors[0])})" if len(tried) == 1 and errors else ""
    if len(tried) > 1 and any(isinstance(e, _BackendUnavailable) and e.backend == "openslide" for e in errors):
        why = f" (OpenSlide itself cannot be imported here: {_INSTALL['openslide']})"
    kind = next((k for magic, k in _MAGIC_KINDS if head.startswith(magic)), None)
    if kind in ("PNG image", "JPEG image") and "image" not in tried:
        return (
            f"{path.name} is a {kind}, which {readers} cannot read; use --backend image (or auto) for "
            "PNG and JPEG files."
        )
    if kind is not None:
        return (
            f"{path.name} starts like a {kind} but {readers} cannot read it{why}, so it is probably "
            "truncated or corrupt; copy or export it again."
        )
    return (
        f"{path.name} is not a slide or image that {readers} can read{why}; check that the file really is "
        "a whole-slide image (.svs, .ndpi, .tif ...) or a PNG/JPEG."
    )


def _parse_mpp(value: Any) -> float | None:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1] else None


def _tiff_tag_mpp(page: Any) -> float | None:
    """Microns per pixel from a TIFF page's XResolution / ResolutionUnit tags."""
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    per_unit = num / den  # pixels per unit
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    microns = {2: 25_400.0, 3: 10_000.0}.get(unit)  # 2 = inch, 3 = centimetre
    return _parse_mpp(microns / per_unit) if microns else None


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """Any 2-D / 3-D image array (gray, gray+alpha, RGB, RGBA; uint8 or uint16) to (H, W, 3) uint8."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[2]
    if channels in (1, 2):  # gray (+ alpha)
        return np.repeat(array[..., :1], 3, axis=2)
    if channels == 4:
        # Composite on white only where alpha < 255 (an opaque pixel's value is its own): the same
        # numbers as compositing everything, without a float pass over a whole thumbnail band.
        rgb = np.ascontiguousarray(array[..., :3])  # (H, W, 3) copy
        partial = array[..., 3] != 255  # (H, W)
        if partial.any():
            alpha = array[..., 3][partial].astype(np.float32)[:, None] / 255.0  # (P, 1)
            rgb[partial] = (array[..., :3][partial].astype(np.float32) * alpha + 255.0 * (1 - alpha)).round()
        return rgb
    return np.ascontiguousarray(array[..., :3])
