"""A ``torch`` dataset of slide tiles read on the fly, safe with several DataLoader workers.

Slides are opened lazily, inside the process that reads them, and cached per process
(keyed by ``os.getpid()``): each DataLoader worker holds its own handle to each slide it
touches, and nothing is opened in the main process unless it reads tiles itself. A
handle is never shared across a ``fork`` and the dataset pickles without handles, so
``spawn`` workers work too.

Two uses:

* feature extraction: ``SlideTileDataset(slides, coords)`` yields
  ``(tile, (x, y), slide_index)`` with ``tile`` a ``uint8`` tensor ``(3, S, S)``
  (or the output of ``transform``), batched by the default collate;
* self-supervised pretraining: ``SlideTileDataset(slides, coords, transform=aug,
  return_meta=False)`` yields whatever ``aug(pil_tile)`` returns (two views, a
  multi-crop list ...).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from histofm.errors import HistofmError
from histofm.wsi.readers import SlideReader, open_slide

SlideLike = str | os.PathLike[str] | SlideReader


class SlideTileDataset(Dataset):
    """Tiles of one or many slides at a target resolution.

    Args:
        slides: slide paths (or open readers, whose path, mpp override and backend are reused).
        coords: per slide, ``(N_i, 2)`` level-0 top-left corners (from :func:`tile_slide`).
        target_mpp: microns per pixel of the tiles.
        tile_size: tile side in pixels at ``target_mpp``.
        transform: applied to each RGB ``PIL.Image`` tile; without it a tile is a
            ``uint8`` tensor ``(3, tile_size, tile_size)``.
        mpp: level-0 mpp override, one value for all slides or one per slide.
        backend: reader backend (see :func:`open_slide`).
        return_meta: return ``(tile, coords, slide_index)`` (default) or only the tile.
        max_open: slides kept open per process (least recently used are closed).
        tile_cache_bytes: decoded stored tiles each open reader keeps (``None``: the reader's
            default, 32 MB; extraction, reading rows in raster order, asks for more).
    """

    def __init__(
        self,
        slides: Sequence[SlideLike],
        coords: Sequence[np.ndarray],
        *,
        target_mpp: float = 0.5,
        tile_size: int = 224,
        transform: Callable[[Image.Image], Any] | None = None,
        mpp: float | Sequence[float | None] | None = None,
        backend: str = "auto",
        return_meta: bool = True,
        max_open: int = 16,
        tile_cache_bytes: int | None = None,
    ) -> None:
        if len(slides) != len(coords):
            raise HistofmError(f"Got {len(slides)} slides but {len(coords)} coordinate arrays; give one array per slide.")
        if mpp is None or isinstance(mpp, (int, float)):
            mpps: list[float | None] = [mpp] * len(slides)  # type: ignore[list-item]
        else:
            mpps = list(mpp)
            if len(mpps) != len(slides):
                raise HistofmError(f"Got {len(mpps)} mpp values for {len(slides)} slides; give one per slide or one for all.")
        self.paths: list[Path] = []
        self.mpps: list[float | None] = []
        self.backends: list[str] = []
        for slide, override in zip(slides, mpps):
            if isinstance(slide, SlideReader):
                self.paths.append(slide.path)
                self.mpps.append(override if override is not None else slide._mpp_override)
                self.backends.append(slide.backend if backend == "auto" else backend)
            else:
                self.paths.append(Path(slide))
                self.mpps.append(override)
                self.backends.append(backend)
        self.coords = [np.asarray(c, dtype=np.int64).reshape(-1, 2) for c in coords]
        self.offsets = np.concatenate([[0], np.cumsum([len(c) for c in self.coords])]).astype(np.int64)
        self.target_mpp = float(target_mpp)
        self.tile_size = int(tile_size)
        self.transform = transform
        self.return_meta = return_meta
        self.max_open = max(1, int(max_open))
        self.tile_cache_bytes = tile_cache_bytes
        self._pid: int | None = None
        self._open: OrderedDict[int, tuple[SlideReader, int, int]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # handles never travel to another process
        state["_pid"] = None
        return state

    def _slide(self, index: int) -> tuple[SlideReader, int, int]:
        """``(reader, level, read_size)`` of slide ``index``, opened in this process on first use."""
        pid = os.getpid()
        if self._pid != pid:  # first use, or we are a freshly forked worker: never reuse a parent's handle
            self._open = OrderedDict()
            self._pid = pid
        entry = self._open.get(index)
        if entry is None:
            reader = open_slide(self.paths[index], mpp=self.mpps[index], backend=self.backends[index])
            if self.tile_cache_bytes is not None:
                reader.tile_cache_bytes = self.tile_cache_bytes
            level, read_size, _ = reader.tile_geometry(self.target_mpp, self.tile_size)
            entry = (reader, level, read_size)
            self._open[index] = entry
            while len(self._open) > self.max_open:
                _, (old, _, _) = self._open.popitem(last=False)
                old.close()
        else:
            self._open.move_to_end(index)
        return entry

    def locate(self, index: int) -> tuple[int, int]:
        """``(slide_index, tile_index)`` of a flat dataset index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        slide_index = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return slide_index, int(index - self.offsets[slide_index])

    def read_tile(self, index: int) -> Image.Image:
        """The RGB tile at a flat index, before any transform."""
        slide_index, tile_index = self.locate(index)
        reader, level, read_size = self._slide(slide_index)
        x, y = self.coords[slide_index][tile_index]
        tile = reader.read_region((int(x), int(y)), level, (read_size, read_size))
        if read_size != self.tile_size:
            tile = tile.resize((self.tile_size, self.tile_size), Image.Resampling.BILINEAR)
        return tile

    def _read_tensor(self, index: int) -> torch.Tensor:
        """``(3, S, S)`` uint8 tile; skips PIL when no resize is needed (the extraction hot path)."""
        slide_index, tile_index = self.locate(index)
        reader, level, read_size = self._slide(slide_index)
        if read_size != self.tile_size:
            return torch.from_numpy(np.array(self.read_tile(index))).permute(2, 0, 1)
        x, y = self.coords[slide_index][tile_index]
        array = reader.read_region_array((int(x), int(y)), level, (read_size, read_size))  # (S, S, 3)
        return torch.from_numpy(array).permute(2, 0, 1)

    def read_into(self, index: int, out: np.ndarray) -> None:
        """Write the uint8 tile at a flat index into ``out`` ``(S, S, 3)`` (a slot of a batch; no transform)."""
        slide_index, tile_index = self.locate(index)
        reader, level, read_size = self._slide(slide_index)
        if read_size != self.tile_size:
            out[...] = np.asarray(self.read_tile(index))
            return
        x, y = self.coords[slide_index][tile_index]
        reader.read_region_array((int(x), int(y)), level, (read_size, read_size), out=out)

    def __getitem__(self, index: int) -> Any:
        if self.transform is not None:
            out = self.transform(self.read_tile(index))
        else:
            out = self._read_tensor(index)  # (3, S, S) uint8
        if not self.return_meta:
            return out
        slide_index, tile_index = self.locate(index)
        return out, torch.from_numpy(self.coords[slide_index][tile_index].copy()), slide_index

    def close(self) -> None:
        """Close the handles this process holds."""
        for reader, _, _ in self._open.values():
            reader.close()
        self._open.clear()


def raster_batches(n: int, batch_size: int, workers: int) -> list[list[int]]:
    """Batches of ``range(n)`` ordered so that each DataLoader worker reads one contiguous band.

    A map-style DataLoader hands batch ``k`` to worker ``k % workers``. Cutting the tiles
    (in raster order) into ``workers`` contiguous bands and interleaving the bands' batches
    gives each worker a band of whole rows, read top to bottom: a stored tile shared by two
    rows of tiles is still in that worker's cache when the second row needs it (with plain
    round-robin batches the row below is often read by another worker, which decodes the
    tile again). The caller puts results back in order with the batches' indices.

    Args:
        n: number of tiles.
        batch_size: tiles per batch.
        workers: DataLoader workers (0 or 1: plain consecutive batches).

    Returns:
        The batches, in the order the DataLoader should yield them.
    """
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if workers <= 1 or len(batches) <= workers:
        return batches
    # Band sizes differ by at most one batch, longer bands first, so that in the last round
    # only the first bands still have a batch and batch k still goes to worker k % workers.
    sizes = [len(batches) // workers + (w < len(batches) % workers) for w in range(workers)]
    starts = np.cumsum([0, *sizes])
    bands = [batches[starts[w] : starts[w + 1]] for w in range(workers)]
    return [band[r] for r in range(sizes[0]) for band in bands if r < len(band)]
