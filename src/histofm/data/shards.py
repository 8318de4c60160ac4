"""Tissue tiles of many slides in WebDataset shards, and a resumable stream that reads them.

Why WebDataset: a shard is a plain POSIX tar file, so ``tar``, Python's ``tarfile``, the
``webdataset`` package, and any object store or HTTP server can list, copy and read it; no
database, no library-specific index, no server. (LitData and MosaicML Streaming write their own
binary chunk formats that only their libraries read.) What WebDataset lacks, an index to plan
from without scanning, is the small ``index.json`` beside the shards.

Layout of a shard folder (written by :func:`write_shards`, ``histofm shard``)::

    index.json          format, shards with their sample counts, tile settings, slides, provenance
    shard-000000.tar    000000000.jpg 000000000.json 000000001.jpg 000000001.json ...
    shard-000001.tar    ...

A sample's key is its global index (9 digits, no dot: WebDataset splits the name at the first
dot); ``.jpg`` holds the tile's JPEG bytes, ``.json`` its metadata: ``slide``, level-0 ``x``/``y``,
``mpp`` (of the tile), ``level0_mpp``, ``tile_size``, ``magnification`` (10 / mpp). Sample ``i``
lives in shard ``s`` with ``offsets[s] <= i < offsets[s] + samples[s]``. Several target mpps
(``--target-mpp 0.5,1.0``, as Virchow2 and UNI sample several magnifications) go into the same
shards; each tile records its own.

:class:`ShardStream` streams them into :func:`histofm.train.fit` (an ``IterableDataset`` with the
engine's step-stream protocol, see :mod:`histofm.train.data`). The sample order is a pure function
of ``(seed, epoch, rank, stream)``, computed from ``index.json`` alone:

* each rank runs ``V = max(num_workers, 1)`` streams; stream ``k = rank * V + v``;
* epoch ``e`` permutes the shards (seeded by ``(seed, e)``) and gives stream ``k`` the shards
  ``perm[k::S]`` (round-robin, ``S = world_size * V`` streams): streams never share a shard, and
  together they cover every sample once per epoch;
* a stream's samples pass through a seeded shuffle buffer of ``buffer_size`` (the usual
  WebDataset buffer: fill, then emit a random slot and refill it), simulated on sample indices,
  so the order is known before any pixel is read;
* each stream is endless (epoch after epoch) and cut into batches of ``batch_size / world_size``;
  local step ``t`` of a rank takes batch ``t // V`` of stream ``t % V``.

A run resumed at step ``s`` recomputes the same order and seeks to it without reading the skipped
samples, so an interrupted and resumed run sees exactly the samples of an uninterrupted one
(given the same seed, batch size, number of processes and of workers). Each tile is augmented
under the seed of ``(seed, epoch, index)``, as map-style datasets are.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from histofm.errors import HistofmError

INDEX_NAME = "index.json"
FORMAT = "webdataset"
FORMAT_VERSION = 1


def is_shard_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding an ``index.json`` of shards."""
    p = Path(path)
    return p.is_dir() and (p / INDEX_NAME).is_file()


# ---------------------------------------------------------------------------------------- writer
@dataclass(frozen=True)
class ShardSettings:
    """How tiles are cut and stored.

    Attributes:
        target_mpps: microns per pixel of the tiles, one or several magnifications.
        tile_size: tile side in pixels (at every target mpp).
        min_tissue: minimum tissue fraction of a kept tile.
        overlap: pixels shared by neighbouring tiles.
        shard_size: samples per shard (the last shard holds the rest).
        quality: JPEG quality.
    """

    target_mpps: tuple[float, ...] = (0.5,)
    tile_size: int = 224
    min_tissue: float = 0.5
    overlap: int = 0
    shard_size: int = 5000
    quality: int = 90

    def check(self) -> None:
        """Raise :class:`HistofmError` for settings that cannot work."""
        if not self.target_mpps or any(m <= 0 for m in self.target_mpps):
            raise HistofmError(f"--target-mpp needs positive microns per pixel, got {list(self.target_mpps)}.")
        if self.shard_size < 1:
            raise HistofmError(f"--shard-size must be at least 1 sample, got {self.shard_size}.")
        if not 1 <= self.quality <= 100:
            raise HistofmError(f"--quality must lie in 1..100, got {self.quality}.")


class _TarShards:
    """Rolls tar shards of ``shard_size`` samples, each written to a temporary name and renamed when full."""

    def __init__(self, out_dir: Path, shard_size: int) -> None:
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards: list[dict[str, Any]] = []
        self._stack: ExitStack | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self.total = 0

    def add(self, jpg: bytes, meta: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        key = f"{self.total:09d}"
        for ext, data in (("jpg", jpg), ("json", json.dumps(meta, sort_keys=True).encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed fields: the same tiles give the same bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.total += 1
        if self._count == self.shard_size:
            self._close()

    def _open(self) -> None:
        from histofm.utils import atomic_path

        name = f"shard-{len(self.shards):06d}.tar"
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.out_dir / name))
        self._tar = self._stack.enter_context(tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT))
        self.shards.append({"file": name, "samples": 0, "offset": self.total - self._count})

    def _close(self) -> None:
        assert self._stack is not None
        self.shards[-1]["samples"] = self._count
        self._stack.close()  # closes the tar, then renames it onto its real name
        self.shards[-1]["bytes"] = (self.out_dir / self.shards[-1]["file"]).stat().st_size
        self._stack, self._tar, self._count = None, None, 0

    def finish(self) -> None:
        if self._tar is not None:
            self._close()

    def abort(self) -> None:
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temporary
            self.shards.pop()


def _slide_tiles(slide: Any, settings: ShardSettings, roi: Any = None) -> list[tuple[float, Any, np.ndarray]]:  # noqa: ANN401
    """``(target_mpp, spec, coords)`` per magnification of one open slide."""
    from histofm.wsi import select_tiles, tile_spec

    out = []
    for mpp in settings.target_mpps:
        spec = tile_spec(slide, mpp, settings.tile_size, settings.overlap)
        try:
            coords = select_tiles(slide, spec, min_tissue=settings.min_tissue, roi=roi).coords
        except HistofmError:
            coords = np.zeros((0, 2), dtype=np.int64)  # no tissue at this magnification
        out.append((mpp, spec, coords))
    return out


def write_shards(
    slides: Sequence[Any],
    out_dir: str | Path,
    settings: ShardSettings = ShardSettings(),
    *,
    mpp_override: float | None = None,
    backend: str = "auto",
    roi: Any = None,  # noqa: ANN401
    progress: bool = True,
) -> dict[str, Any]:
    """Write the tissue tiles of ``slides`` into WebDataset shards under ``out_dir``; returns the index.

    Args:
        slides: :class:`~histofm.wsi.SlideInput` items or paths.
        out_dir: the shard folder (created; must not hold an ``index.json`` yet).
        settings: tiling and storage settings.
        mpp_override: level-0 mpp for slides without one of their own.
        backend: slide reader backend.
        roi: a :class:`~histofm.wsi.RoiFilter` (QuPath regions) restricting the tiles, or ``None``.
        progress: show a rich progress bar per slide.

    A slide that cannot be read is reported on stderr and left out (``index.json`` lists it under
    ``failed``). Each slide row records its path, level-0 mpp, first sample, tiles per magnification
    and fingerprint (:func:`histofm.wsi.provenance.slide_fingerprint`). ``index.json`` is written
    last, so a folder without it is an unfinished write.
    """
    from histofm._version import __version__
    from histofm.utils import atomic_path
    from histofm.wsi import SlideInput, open_slide
    from histofm.wsi.provenance import slide_fingerprint

    settings.check()
    out = Path(out_dir)
    if (out / INDEX_NAME).exists():
        raise HistofmError(f"{out} already holds shards ({INDEX_NAME}); choose another --out or delete it.")
    out.mkdir(parents=True, exist_ok=True)
    items = [s if isinstance(s, SlideInput) else SlideInput(Path(s)) for s in slides]
    if not items:
        raise HistofmError("No slides given; pass slide files, folders or a CSV list.")
    writer = _TarShards(out, settings.shard_size)
    slide_rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    t0 = time.perf_counter()
    bars = _progress(progress)
    try:
        with bars:
            overall = bars.add_task("slides", total=len(items))
            for item in items:
                mpp = item.mpp if item.mpp is not None else mpp_override
                try:
                    with open_slide(item.path, mpp=mpp, backend=backend) as slide:
                        plan = _slide_tiles(slide, settings, roi)
                        n = int(sum(len(c) for _, _, c in plan))
                        task = bars.add_task(slide.name, total=n)
                        first = writer.total
                        for target, _, coords in plan:
                            for x, y in coords.tolist():
                                tile = slide.read_region_mpp(int(x), int(y), settings.tile_size, target)
                                buf = io.BytesIO()
                                tile.save(buf, format="JPEG", quality=settings.quality)
                                writer.add(buf.getvalue(), {
                                    "slide": slide.name, "x": int(x), "y": int(y), "mpp": target,
                                    "level0_mpp": slide.mpp, "tile_size": settings.tile_size,
                                    "magnification": round(10.0 / target, 3),
                                })
                                bars.advance(task)
                        bars.remove_task(task)
                        slide_rows.append({
                            "slide": slide.name, "path": str(item.path), "level0_mpp": slide.mpp,
                            "fingerprint": slide_fingerprint(item.path),
                            "first_sample": first, "tiles": {f"{m:g}": len(c) for m, _, c in plan},
                        })
                except HistofmError as e:
                    print(f"histofm: error: {e}", file=sys.stderr)
                    failed.append({"path": str(item.path), "error": str(e)})
                bars.advance(overall)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    if writer.total == 0:
        raise HistofmError("No tissue tile was found in any slide; lower --min-tissue or check the slides.")
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "samples": writer.total,
        "shards": writer.shards,
        "fields": {"jpg": "RGB tile, JPEG", "json": "slide, x, y (level 0), mpp, level0_mpp, tile_size, magnification"},
        "tiles": {
            "target_mpps": list(settings.target_mpps), "tile_size": settings.tile_size,
            "min_tissue": settings.min_tissue, "overlap": settings.overlap, "jpeg_quality": settings.quality,
            "shard_size": settings.shard_size,
        },
        "slides": slide_rows,
        "failed": failed,
        "provenance": {
            "histofm_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 3), "backend": backend, "mpp_override": mpp_override,
        },
    }
    with atomic_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return index


def _progress(enabled: bool) -> Any:  # noqa: ANN401
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not enabled)


# ---------------------------------------------------------------------------------------- reader
def read_index(root: str | Path) -> dict[str, Any]:
    """The checked ``index.json`` of a shard folder."""
    path = Path(root) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise HistofmError(f"{root} holds no {INDEX_NAME}; write the shards with `histofm shard` first.") from None
    except (OSError, ValueError) as e:
        raise HistofmError(f"{path} is unreadable ({type(e).__name__}); write the shards again with `histofm shard`.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not index.get("shards"):
        raise HistofmError(f"{path} is not a histofm shard index; write the shards again with `histofm shard`.")
    return index


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (NumPy's SeedSequence: no correlated neighbours)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def buffer_shuffle(ids: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The order a shuffle buffer of ``size`` slots emits ``ids`` in (fill; emit a random slot, refill; drain)."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    if size <= 1 or n <= 1:
        return ids.copy()
    size = min(size, n)
    picks = rng.integers(0, size, n - size)  # one draw per emitted sample while the stream lasts
    buf = ids[:size].copy()
    out = np.empty(n, dtype=ids.dtype)
    for i in range(n - size):
        j = picks[i]
        out[i] = buf[j]
        buf[j] = ids[size + i]
    out[n - size :] = buf[rng.permutation(size)]
    return out


@dataclass(frozen=True)
class _Plan:
    seed: int
    local_batch: int
    rank: int
    world_size: int
    streams_per_rank: int
    start_step: int
    stop_step: int
    views: Callable[[Any, int, int], Any] | None


class ShardStream(IterableDataset):
    """Stream the tiles of a shard folder into :func:`histofm.train.fit` (see the module docstring).

    Yields, per local step, ``(batch, keys)``: ``batch`` the collated transformed tiles of this
    rank, ``keys`` their ``"epoch/index"`` names (what the engine's sample trace records).

    Args:
        root: the shard folder (with ``index.json``).
        buffer_size: slots of the shuffle buffer.
    """

    def __init__(self, root: str | Path, *, buffer_size: int = 1000) -> None:
        self.root = Path(root)
        self.index = read_index(self.root)
        self.files = [s["file"] for s in self.index["shards"]]
        self.counts = np.array([int(s["samples"]) for s in self.index["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.buffer_size = buffer_size
        self._plan: _Plan | None = None
        self._open: OrderedDict[int, _ShardFile] = OrderedDict()

    def __len__(self) -> int:
        return int(self.counts.sum())

    # ------------------------------------------------------------------ the step-stream protocol
    def plan_steps(
        self,
        *,
        seed: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        start_step: int = 0,
        stop_step: int,
        views: Callable[[Any, int, int], Any] | None = None,
    ) -> None:
        """Fix the order for steps ``[start_step, stop_step)`` of this rank (called by the engine).

        ``views(image, epoch, index)`` makes a sample's views (the engine passes the method's
        transform under the sample's seed); without it a tile is a ``uint8`` tensor ``(3, S, S)``.
        """
        if global_batch % world_size:
            raise HistofmError(f"batch_size {global_batch} must be divisible by the number of processes ({world_size}).")
        v = max(num_workers, 1)
        if len(self.files) < world_size * v:
            raise HistofmError(
                f"{self.root} has {len(self.files)} shards, fewer than the {world_size * v} streams "
                f"({world_size} processes x {v} workers) reading them; write smaller shards (--shard-size) or use fewer --workers."
            )
        self._plan = _Plan(seed, global_batch // world_size, rank, world_size, v, start_step, stop_step, views)

    def _need_plan(self) -> _Plan:
        if self._plan is None:
            raise HistofmError("ShardStream.plan_steps(...) must be called before iterating (fit() does it).")
        return self._plan

    # ------------------------------------------------------------------ order (no pixels read)
    def stream_order(self, stream: int, epoch: int) -> np.ndarray:
        """Global sample indices of ``stream`` in ``epoch``, in the order they are used."""
        p = self._need_plan()
        n_streams = p.world_size * p.streams_per_rank
        g = torch.Generator().manual_seed(_seed(p.seed, epoch, 0x5A4D))
        perm = torch.randperm(len(self.files), generator=g).tolist()
        mine = perm[stream::n_streams]
        ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s] + self.counts[s]) for s in mine])
        return buffer_shuffle(ids, self.buffer_size, _seed(p.seed, epoch, stream, 0xB0FF))

    def stream_samples(self, stream: int, skip: int = 0) -> Iterator[tuple[int, int]]:
        """``(epoch, index)`` of ``stream`` from its ``skip``-th sample on, endlessly."""
        epoch = 0
        while True:  # whole epochs skipped by their lengths alone (shard counts from index.json)
            p = self._need_plan()
            g = torch.Generator().manual_seed(_seed(p.seed, epoch, 0x5A4D))
            perm = torch.randperm(len(self.files), generator=g).tolist()
            length = int(self.counts[perm[stream :: p.world_size * p.streams_per_rank]].sum())
            if skip < length:
                break
            skip -= length
            epoch += 1
        while True:
            order = self.stream_order(stream, epoch)
            for i in order[skip:].tolist():
                yield epoch, i
            skip, epoch = 0, epoch + 1

    def step_keys(self, step: int) -> list[str]:
        """This rank's sample keys at local ``step`` (recomputed from the plan, for tests and tools)."""
        p = self._need_plan()
        v, b = step % p.streams_per_rank, step // p.streams_per_rank
        it = self.stream_samples(p.rank * p.streams_per_rank + v, b * p.local_batch)
        return [f"{e}/{i}" for e, i in (next(it) for _ in range(p.local_batch))]

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator[tuple[Any, list[str]]]:
        p = self._need_plan()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and workers != p.streams_per_rank:
            raise HistofmError(f"The stream was planned for {p.streams_per_rank} workers but runs in {workers}.")
        # DataLoader workers take steps round-robin (worker w: start + w, start + w + W, ...), so each
        # worker serves one stream; read in the main process, every stream is served in turn.
        streams: dict[int, Iterator[tuple[int, int]]] = {}
        for t in range(p.start_step + worker, p.stop_step, workers):
            v = t % p.streams_per_rank
            if v not in streams:
                streams[v] = self.stream_samples(p.rank * p.streams_per_rank + v, (t // p.streams_per_rank) * p.local_batch)
            yield self._load_batch([f"{e}/{i}" for e, i in (next(streams[v]) for _ in range(p.local_batch))])

    def _load_batch(self, keys: list[str]) -> tuple[Any, list[str]]:
        p = self._need_plan()
        items = []
        for key in keys:
            epoch, index = map(int, key.split("/"))
            item = self.read_image(index)
            if p.views is not None:
                item = p.views(item, epoch, index)
            if isinstance(item, Image.Image):
                item = torch.from_numpy(np.array(item)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
            items.append(item)
        return default_collate(items), keys

    def _shard(self, s: int) -> _ShardFile:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        f = _ShardFile(self.root / self.files[s])
        self._open[s] = f
        while len(self._open) > 4:  # a shuffle window spans a few shards at most
            self._open.popitem(last=False)[1].close()
        return f

    def read_sample(self, index: int) -> tuple[bytes, dict[str, Any]]:
        """JPEG bytes and metadata of global sample ``index``."""
        key = f"{index:09d}"
        shard = self._shard(self._shard_of(index))
        return shard.read_bytes(f"{key}.jpg"), json.loads(shard.read_bytes(f"{key}.json"))

    def _shard_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise HistofmError(f"Sample {index} is outside {self.root} ({len(self)} samples).")
        return int(np.searchsorted(self.offsets, index, side="right") - 1)

    def read_image(self, index: int) -> Image.Image:
        """The RGB tile of global sample ``index``."""
        jpg = self._shard(self._shard_of(index)).read_bytes(f"{index:09d}.jpg")
        try:
            return Image.open(io.BytesIO(jpg)).convert("RGB")
        except Exception as e:  # Pillow raises many types for broken JPEG data
            raise HistofmError(
                f"Sample {index} of {self.root} is not a readable JPEG ({type(e).__name__}); write the shards again."
            ) from None

    def preview(self, n: int) -> list[Image.Image]:
        """The first ``n`` tiles (index order), e.g. for the collapse watch and reconstructions."""
        return [self.read_image(i) for i in range(min(n, len(self)))]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file handles stay in the process that opened them
        return state


class _ShardFile:
    """One tar shard opened for random reads: member offsets from its headers, then seek + read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with tarfile.open(path, "r:") as tar:
                self.members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError) as e:
            raise HistofmError(f"Shard {path} is missing or not a tar file ({type(e).__name__}); write the shards again.") from None
        self._fh = open(path, "rb")  # noqa: SIM115 - kept open for many reads, closed by close()

    def read_bytes(self, name: str) -> bytes:
        try:
            offset, size = self.members[name]
        except KeyError:
            raise HistofmError(f"Shard {self.path.name} lacks {name}; the shard folder is incomplete, write it again.") from None
        self._fh.seek(offset)
        return self._fh.read(size)

    def close(self) -> None:
        self._fh.close()
