"""Feature extraction: one HDF5 file per slide, in the layout CLAM and TRIDENT read.

For each slide: find tissue, tile it, read the tiles with a DataLoader (several workers,
one slide handle per worker), embed them with a tile encoder and write
``<out>/<slide name>.h5``:

* ``features``: ``(N, D)`` float32, one row per tile;
* ``coords``: ``(N, 2)`` int64, level-0 ``(x, y)`` of each tile's top-left corner, with the
  attributes CLAM (``patch_size``, ``patch_level``, ``custom_downsample``) and TRIDENT
  (``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``,
  ``name``) read;
* file attributes: ``model_name``, ``embed_dim``, ``mpp``, ``tile_size``, ``level``,
  ``level0_mpp``, ``overlap``, ``min_tissue``, ``slide``, ``histofm_version``.

The file is written under a temporary name and renamed, so a crash never leaves a half
file. A slide whose file already exists with the same settings is skipped; a slide that
fails is reported at the end and the others go on. :func:`shard_slides` splits a slide
list by rank, so ``torchrun`` processes can share a batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from histofm import accel
from histofm.errors import HistofmError
from histofm.utils import atomic_path, default_device, remove_stale_temps
from histofm.wsi.dataset import SlideTileDataset
from histofm.wsi.readers import open_slide
from histofm.wsi.tiling import tile_slide, tile_spec
from histofm.wsi.tissue import detect_tissue

# File attributes that must match for an existing output to count as done.
_RESUME_KEYS = ("model_name", "mpp", "tile_size", "overlap", "min_tissue")


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of a feature-extraction run.

    Attributes:
        target_mpp: microns per pixel of the tiles.
        tile_size: tile side in pixels at ``target_mpp``.
        overlap: pixels shared by neighbouring tiles.
        min_tissue: minimum tissue fraction of a kept tile.
        batch_size: tiles per forward pass.
        num_workers: DataLoader worker processes reading tiles.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; ``None`` picks the best available.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; features are stored as float32).
        backend: slide reader backend (see :func:`histofm.wsi.open_slide`).
        overwrite: redo slides whose output already exists.
        compile: ``torch.compile`` each Transformer block of the encoder (regional compilation;
            the first batch includes the compilation, worth it for long runs on a GPU).
        channels_last: feed the encoder NHWC images with NHWC convolution weights (helps
            convolutional encoders on GPUs; a ViT only has its patch-embedding convolution).
    """

    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.5
    batch_size: int = 64
    num_workers: int = 0
    device: str | None = None
    precision: str = "fp32"
    backend: str = "auto"
    overwrite: bool = False
    compile: bool = False
    channels_last: bool = False


@dataclass
class SlideResult:
    """What happened to one slide."""

    slide: str
    status: str  # "done", "skipped" or "failed"
    tiles: int = 0
    seconds: float = 0.0
    output: Path | None = None
    error: str | None = None

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ExtractionReport:
    """Per-slide results of :func:`extract_features` and their totals."""

    results: list[SlideResult] = field(default_factory=list)

    @property
    def failures(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def tiles(self) -> int:
        return sum(r.tiles for r in self.results if r.status == "done")

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results if r.status == "done")

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: slides done / skipped / failed, tiles and throughput."""
        done = sum(r.status == "done" for r in self.results)
        skipped = sum(r.status == "skipped" for r in self.results)
        return (
            f"{len(self.results)} slides: {done} done, {skipped} skipped, {len(self.failures)} failed; "
            f"{self.tiles} tiles in {self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s)"
        )

    def table(self) -> Any:
        """A ``rich`` table, one row per slide (print :meth:`summary` after it)."""
        from rich.table import Table

        table = Table(title="Feature extraction")
        table.add_column("slide", overflow="fold")
        table.add_column("status", no_wrap=True)
        for col in ("tiles", "seconds", "tiles/s"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("output / error", overflow="fold")
        for r in self.results:
            style = {"failed": "red", "skipped": "dim"}.get(r.status)
            table.add_row(
                r.slide, r.status, str(r.tiles), f"{r.seconds:.1f}", f"{r.tiles_per_second:.1f}",
                r.error or (str(r.output) if r.output else ""), style=style,
            )
        return table


def shard_slides(slides: Sequence[Any], rank: int = 0, world_size: int = 1) -> list[Any]:
    """The slides process ``rank`` of ``world_size`` handles (round-robin, order kept)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise HistofmError(f"Rank {rank} is not valid for a world size of {world_size}.")
    return list(slides)[rank::world_size]


def read_features(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features (N, D) float32, coords (N, 2) int64, attrs)`` from a feature file.

    Reads our files and CLAM / TRIDENT ones; ``attrs`` merges the file's attributes with
    those of ``coords``.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"Feature file not found: {path}; run `histofm extract` first.")
    try:
        with h5py.File(path, "r") as f:
            features = np.asarray(f["features"][:], dtype=np.float32)
            coords = np.asarray(f["coords"][:], dtype=np.int64)
            attrs = {**_plain(f["coords"].attrs), **_plain(f.attrs)}
    except (OSError, KeyError) as e:
        raise HistofmError(f"{path.name} is not a feature file with 'features' and 'coords' datasets ({e}).") from None
    features = features.reshape(len(features), -1)
    if len(features) != len(coords):
        raise HistofmError(f"{path.name} holds {len(features)} feature rows but {len(coords)} coordinates; extract it again.")
    return features, coords, attrs


def _plain(attrs: Any) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, bytes):
            v = v.decode()
        out[k] = v
    return out


def _model_name(model: nn.Module) -> str:
    return str(getattr(model, "histofm_name", type(model).__name__))


class _Preprocess:
    """Per-tile transform (in the workers) and per-batch normalisation (on the device).

    When the model's preprocessing is only "to float, subtract mean, divide by std" at the
    tile size (no resize, no crop), tiles travel as uint8 and are normalised on the device
    in one batched operation: identical numbers, a quarter of the inter-process traffic and
    no per-tile Python work. Otherwise the model's own ``eval_transform`` runs per tile.
    """

    def __init__(
        self, model_name: str, tile_size: int, transform: Callable[..., Any] | None, *, channels_last: bool = False
    ) -> None:
        from histofm.registry import IMAGENET_MEAN, IMAGENET_STD, model_info

        self.channels_last = channels_last
        self._buffer: torch.Tensor | None = None  # reused float input on CPU (see batch)
        self.tile_transform = transform
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        if transform is not None:
            return
        try:
            info = model_info(model_name)
        except HistofmError:  # a custom module: ImageNet statistics, tiles as they are
            return
        self.mean, self.std = tuple(info.mean), tuple(info.std)
        if info.resize is None and tuple(info.input_size[1:]) == (tile_size, tile_size):
            return  # fast path: batched normalisation
        self.tile_transform = _eval_transform(model_name, info)

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack a batch in the worker; uint8 tiles stay channels-last, so stacking is a plain copy."""
        # default_collate stacks straight into shared memory inside a worker (no extra copy on send).
        xy = default_collate([item[1] for item in items])  # (B, 2)
        if self.tile_transform is not None:
            return default_collate([item[0] for item in items]), xy  # (B, 3, S, S) from the transform
        # The dataset's (3, S, S) tiles are views of (S, S, 3) arrays: undo the view, not the memory.
        return default_collate([item[0].permute(1, 2, 0) for item in items]), xy  # (B, S, S, 3) uint8

    def batch(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The model input ``(B, 3, S, S)`` on ``device`` from a collated batch."""
        x = x.to(device, non_blocking=True)
        if self.tile_transform is not None:
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        scale = 1.0 / (torch.tensor(self.std, device=device) * 255.0)  # (3,) broadcast over the last dim
        shift = -torch.tensor(self.mean, device=device) * 255.0 * scale
        # Normalise on the dense (B, S, S, 3) memory, then hand the model a channels-last view:
        # no transpose copy, and 2-3x faster than broadcasting over (1, 3, 1, 1) on CPU.
        if device.type == "cpu":
            # One reused float buffer (a fresh 38 MB array per batch costs its page faults every
            # time) and one fused x * scale + shift pass: 3x faster than x.float().sub_().mul_().
            if self._buffer is None or self._buffer.shape[1:] != x.shape[1:] or len(self._buffer) < len(x):
                self._buffer = torch.empty(x.shape, dtype=torch.float32)
            buf = self._buffer[: len(x)].copy_(x)
            x = torch.addcmul(shift, buf, scale, out=buf)  # (B, S, S, 3)
        else:
            x = torch.addcmul(shift, x.float(), scale)  # (B, S, S, 3)
        return x.permute(0, 3, 1, 2)  # (B, 3, S, S)

    def owns(self, t: torch.Tensor) -> bool:
        """True when ``t`` shares memory with the reused input buffer (a model returning a view of its input)."""
        return self._buffer is not None and t.untyped_storage().data_ptr() == self._buffer.untyped_storage().data_ptr()


def _eval_transform(model_name: str, info: Any) -> Callable[..., Any]:
    """The model's own eval transform, or resize + centre crop + its normalisation."""
    try:
        from histofm.data.transforms import eval_transform_for  # written by the model zoo
    except ModuleNotFoundError as e:
        if e.name != "histofm.data.transforms":
            raise
    else:
        return eval_transform_for(info)
    from torchvision import transforms as T

    size = int(info.input_size[-1])
    return T.Compose(
        [
            T.Resize(info.resize or size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(info.mean, info.std),
        ]
    )


def _resume_state(path: Path, wanted: dict[str, Any]) -> str:
    """``"absent"``, ``"done"`` (same settings), ``"different"`` or ``"broken"``."""
    if not path.exists():
        return "absent"
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if len(f["features"]) != len(f["coords"]):
                return "broken"
            have = _plain(f.attrs)
    except (OSError, KeyError):
        return "broken"
    for key in _RESUME_KEYS:
        a, b = have.get(key), wanted.get(key)
        if isinstance(a, float) or isinstance(b, float):
            if a is None or b is None or not math.isclose(float(a), float(b), rel_tol=1e-6):
                return "different"
        elif a != b:
            return "different"
    return "done"


def _one_line(e: BaseException) -> str:
    """A one-sentence message, also for errors re-raised from DataLoader workers."""
    text = str(e).strip()
    if "Original Traceback" in text:  # DataLoader re-raise: keep the original message only
        text = text.rsplit("\n", 1)[-1]
        text = text.split(": ", 1)[1] if text.startswith(("histofm.errors.HistofmError", "HistofmError")) else text
    if not isinstance(e, HistofmError) and "Original Traceback" not in str(e):
        text = f"{type(e).__name__}: {text}"
    return " ".join(text.split())


def extract_features(
    slides: Sequence[str | os.PathLike[str]],
    model: str | nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    config: ExtractConfig | None = None,
    mpp: float | None = None,
    transform: Callable[..., Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    console: Any = None,
) -> ExtractionReport:
    """Embed the tissue tiles of each slide and write ``<out_dir>/<slide name>.h5``.

    Args:
        slides: slide paths; with ``world_size > 1`` only this rank's shard is processed.
        model: a module mapping ``(B, 3, S, S)`` to ``(B, D)`` (for example
            ``histofm.create_model("uni", checkpoint_path=...)``), or a registered name, which
            is built without weights (random features: only useful for tests and timing).
        out_dir: output directory (created if missing).
        config: the run's settings (:class:`ExtractConfig`).
        mpp: level-0 mpp override for slides without (or with wrong) metadata.
        transform: per-tile transform of an RGB PIL tile to a tensor; default: the model's own.
        rank: this process's rank (``torchrun``).
        world_size: number of processes sharing the slide list.
        progress: show rich progress bars (per slide and overall).
        console: a ``rich.console.Console`` to print to.

    Returns:
        The :class:`ExtractionReport`; failed slides are in ``report.failures``.
    """
    import histofm

    cfg = config or ExtractConfig()
    paths = [Path(s) for s in shard_slides(slides, rank, world_size)]
    names = [p.stem for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise HistofmError(f"Several slides share the name {dupes[0]!r}, so their outputs would collide; rename them.")
    if isinstance(model, str):
        model = histofm.create_model(model)
    name = _model_name(model)
    device = torch.device(cfg.device) if cfg.device else default_device()
    model = model.to(device).eval()
    if cfg.channels_last:
        accel.channels_last(model)
    if cfg.compile:
        accel.compile_blocks(model)
    pre = _Preprocess(name, cfg.tile_size, transform, channels_last=cfg.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, "bad")
    if dtype == "bad":
        raise HistofmError(f"Unknown precision {cfg.precision!r}; choose fp32, bf16 or fp16.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # temp files of a process killed mid-write
    wanted = {
        "model_name": name,
        "mpp": float(cfg.target_mpp),
        "tile_size": int(cfg.tile_size),
        "overlap": int(cfg.overlap),
        "min_tissue": float(cfg.min_tissue),
    }

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    report = ExtractionReport()
    with _cores_for_readers(device, cfg.num_workers), Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not progress, transient=False,
    ) as bars:
        overall = bars.add_task("slides", total=len(paths))
        for path in paths:
            out_path = out_dir / f"{path.stem}.h5"
            # Temporaries of this slide's file left by a killed run. Per file, not per folder:
            # other ranks may be writing their own slides into the same folder right now.
            remove_stale_temps(out_path)
            state = "absent" if cfg.overwrite else _resume_state(out_path, wanted)
            if state == "done":
                report.results.append(SlideResult(path.name, "skipped", output=out_path))
                bars.advance(overall)
                continue
            if state == "different":
                report.results.append(
                    SlideResult(
                        path.name, "failed",
                        error=f"{out_path.name} exists with other settings (model, mpp, tile size, overlap or "
                        "min tissue); use another --out or pass --overwrite.",
                    )
                )
                bars.advance(overall)
                continue
            start = time.perf_counter()
            try:
                n = _extract_one(path, model, name, out_path, cfg, pre, device, dtype, mpp, wanted, bars)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one bad slide must not stop the batch
                report.results.append(SlideResult(path.name, "failed", seconds=time.perf_counter() - start, error=_one_line(e)))
            else:
                report.results.append(SlideResult(path.name, "done", n, time.perf_counter() - start, out_path))
            bars.advance(overall)
    return report


@contextlib.contextmanager
def _cores_for_readers(device: torch.device, num_workers: int) -> Iterator[None]:
    """On CPU, leave the reading workers their cores: fewer intra-op threads in this process.

    Otherwise the encoder's threads and the workers fight for the same cores, and idle
    OpenMP threads spin; the previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    if device.type == "cpu" and num_workers > 0:
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - num_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _extract_one(
    path: Path,
    model: nn.Module,
    name: str,
    out_path: Path,
    cfg: ExtractConfig,
    pre: _Preprocess,
    device: torch.device,
    dtype: torch.dtype | None,
    mpp: float | None,
    wanted: dict[str, Any],
    bars: Any,
) -> int:
    import h5py

    import histofm

    with open_slide(path, mpp=mpp, backend=cfg.backend) as slide:
        spec = tile_spec(slide, cfg.target_mpp, cfg.tile_size, cfg.overlap)
        tissue = detect_tissue(slide) if cfg.min_tissue > 0 else None
        coords = tile_slide(
            slide, cfg.target_mpp, cfg.tile_size, overlap=cfg.overlap, min_tissue=cfg.min_tissue, tissue=tissue
        )
        backend = slide.backend
    dataset = SlideTileDataset(
        [path], [coords], target_mpp=cfg.target_mpp, tile_size=cfg.tile_size,
        transform=pre.tile_transform, mpp=mpp, backend=backend,
    )
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, collate_fn=pre.collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    task = bars.add_task(f"  {path.name}", total=len(dataset))
    chunks: list[np.ndarray] = []
    batches = iter(loader)
    try:
        with torch.inference_mode():
            for tiles, _xy in batches:
                x = pre.batch(tiles, device)  # (B, 3, S, S)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    emb = model(x)  # (B, D)
                if emb.ndim != 2 or len(emb) != len(x):
                    raise HistofmError(
                        f"The model returned shape {tuple(emb.shape)} for a batch of {len(x)} tiles; "
                        "a tile encoder must return (B, D) embeddings."
                    )
                emb = emb.float().cpu()
                chunks.append((emb.clone() if pre.owns(emb) else emb).numpy())  # the buffer is reused next batch
                bars.advance(task, len(x))
    finally:
        bars.remove_task(task)
        # After a worker error the iterator sits in a reference cycle with the exception, and its
        # garbage-collected shutdown waits 5 s per worker: stop the workers now instead.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    features = np.concatenate(chunks, axis=0).astype(np.float32)  # (N, D)
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            dset = f.create_dataset("coords", data=coords.astype(np.int64))
            for key, value in {**spec.attrs(), "name": path.stem}.items():
                dset.attrs[key] = value
            f.attrs.update(
                {
                    **wanted,
                    "embed_dim": int(features.shape[1]),
                    "level": int(spec.level),
                    "level0_mpp": float(spec.level0_mpp),
                    "read_size": int(spec.read_size),
                    "slide": path.name,
                    "backend": backend,
                    "histofm_version": histofm.__version__,
                }
            )
    return len(features)
