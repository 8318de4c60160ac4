"""Feature extraction: one HDF5 file per slide, in the layout TRIDENT or CLAM reads.

For each slide: find the tiles (tissue, a GeoJSON region, or reused coordinates; see
:mod:`histofm.wsi.selection`), read them with a DataLoader (several workers, one slide
handle per worker), embed them with a tile encoder and write, by ``layout``
(:mod:`histofm.wsi.layouts`):

* ``features``: ``(N, D)`` float32, one row per tile;
* ``coords``: ``(N, 2)`` int64, level-0 ``(x, y)`` of each tile's top-left corner, with the
  attributes of the layout's tool, in that tool's meaning;
* file attributes: the provenance (model, weights, preprocessing, tiling, slide, version;
  :mod:`histofm.wsi.provenance`), read back with :func:`read_provenance`.

The file is written under a temporary name and renamed, so a crash never leaves a half
file. A slide whose file already exists with the same provenance is skipped; with any
difference the slide is refused in one sentence naming what differs. A slide that fails
is reported at the end and the others go on. :func:`shard_slides` splits a slide list by
rank, so ``torchrun`` processes can share a batch.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from histofm import accel
from histofm.checks import check_alloc
from histofm.errors import HistofmError
from histofm.utils import atomic_path, default_device, remove_stale_temps
from histofm.weights import weights_of
from histofm.wsi.ahead import SelectionAhead
from histofm.wsi.dataset import SlideTileDataset, raster_batches
from histofm.wsi.layouts import (
    check_layout,
    coords_attrs,
    coords_description,
    feature_path,
    find_coords_file,
    pt_path,
)
from histofm.wsi.locks import slide_lock
from histofm.wsi.preprocess import _eval_transform, _file_label, _Preprocess  # noqa: F401  (tests import _eval_transform here)
from histofm.wsi.provenance import differences, read_provenance, slide_fingerprint
from histofm.wsi.readers import SlideReader, open_slide
from histofm.wsi.report import ExtractionReport, SlideResult, shard_slides
from histofm.wsi.roi import RoiFilter
from histofm.wsi.selection import TileSelection, select_tiles
from histofm.wsi.slides import SlideInput
from histofm.wsi.threaded import ThreadedTiles
from histofm.wsi.tiling import TileSpec, tile_spec

# Decoded stored tiles kept per reader while extracting (rows in raster order: the stored tiles a row
# of tiles shares with the next must still be there; 128 MB is about two rows across a 100,000 px level).
_ROW_CACHE_BYTES = 128 * 2**20

__all__ = [
    "ExtractConfig", "ExtractionReport", "SlideResult", "extract_features", "read_features", "read_provenance",
    "shard_slides",
]


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
        layout: ``"trident"``, ``"clam"`` or ``"flat"`` (``<out>/<slide>.h5``, TRIDENT's
            attributes); see :mod:`histofm.wsi.layouts`.
        coords_dir: reuse coordinates from ``histofm tile``, TRIDENT or CLAM in this folder
            instead of detecting tissue.
        roi: a GeoJSON region or tissue mask (:class:`~histofm.wsi.roi.RoiFilter`).
        stain_norm: stain-normalise every tile onto ``stain_target`` before the encoder's
            normalisation: ``"macenko"``, ``"reinhard"`` or ``"vahadane"`` (:mod:`histofm.data.stain`);
            recorded in the provenance, so normalised and raw features never mix.
        stain_target: the target image (a file, a slide, or a bundled sample name).
        reader_threads: where tiles are decoded from the slide's stored tiles and need no per-tile
            transform, read them with ``num_workers`` threads of this process instead of DataLoader
            worker processes (same pixels; see :mod:`histofm.wsi.threaded`).
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
    layout: str = "flat"
    coords_dir: Path | None = None
    roi: RoiFilter | None = None
    stain_norm: str | None = None
    stain_target: str | None = None
    reader_threads: bool = True


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


def _resume_state(path: Path, wanted: dict[str, Any], layout: str) -> tuple[str, list[str]]:
    """``("absent" | "done" | "different" | "broken", differences)`` of an existing output."""
    if not path.exists():
        return "absent", []
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if len(f["features"]) != len(f["coords"]):
                return "broken", []
        have = read_provenance(path)
    except (OSError, KeyError, HistofmError):
        return "broken", []
    if layout == "clam" and not pt_path(path.parent.parent, path.stem).is_file():
        return "broken", []
    diffs = differences(have, wanted)
    return ("different", diffs) if diffs else ("done", [])


def _one_line(e: BaseException) -> str:
    """A one-sentence message, also for errors re-raised from DataLoader workers."""
    text = str(e).strip()
    if "Original Traceback" in text:  # DataLoader re-raise: keep the original message only
        text = text.rsplit("\n", 1)[-1]
        text = text.split(": ", 1)[1] if text.startswith(("histofm.errors.HistofmError", "HistofmError")) else text
    if not isinstance(e, HistofmError) and "Original Traceback" not in str(e):
        text = f"{type(e).__name__}: {text}"
    return " ".join(text.split())


def _preprocessing_warning(name: str, cfg: ExtractConfig) -> str | None:
    """One sentence when the tiles differ from the zoo model's recorded preprocessing (None otherwise)."""
    from histofm.registry import _entry

    try:
        info = _entry(name).info
    except HistofmError:
        return None
    if info is None:  # a generic architecture: no recorded preprocessing to compare with
        return None
    size = int(info.input_size[-1])
    if size == cfg.tile_size and abs(info.mpp - cfg.target_mpp) <= 0.01 * info.mpp:
        return None
    return (
        f"{name} was trained on {size} px tiles at {info.mpp:g} um/px, but this run extracts {cfg.tile_size} px tiles "
        f"at {cfg.target_mpp:g} um/px; set --tile-size {size} --target-mpp {info.mpp:g} to match the model."
    )


def _as_inputs(slides: Sequence[Any]) -> list[SlideInput]:
    return [s if isinstance(s, SlideInput) else SlideInput(Path(s)) for s in slides]


def extract_features(
    slides: Sequence[str | os.PathLike[str] | SlideInput],
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
    warn: Callable[[str], None] | None = None,
) -> ExtractionReport:
    """Embed the tiles of each slide and write one feature file per slide in ``config.layout``.

    Args:
        slides: slide paths, or :class:`~histofm.wsi.slides.SlideInput` with a per-slide mpp;
            with ``world_size > 1`` only this rank's shard is processed.
        model: a module mapping ``(B, 3, S, S)`` to ``(B, D)``, best built with
            :func:`histofm.weights.load_encoder` so the file records its weights (a module
            built otherwise is recorded as ``weights_source = "unrecorded"``). A registered
            name alone is refused: histofm never embeds with random weights unless asked.
        out_dir: output directory (created if missing).
        config: the run's settings (:class:`ExtractConfig`).
        mpp: level-0 mpp override for slides without (or with wrong) metadata; a slide's
            own ``SlideInput.mpp`` wins.
        transform: per-tile transform of an RGB PIL tile to a tensor; default: the model's own.
        rank: this process's rank (``torchrun``).
        world_size: number of processes sharing the slide list.
        progress: show rich progress bars (per slide and overall).
        console: a ``rich.console.Console`` to print to.
        warn: called once with a sentence when the tiles differ from the model's recorded
            tile size or mpp (default: :func:`warnings.warn`).

    Returns:
        The :class:`ExtractionReport`; failed slides are in ``report.failures``.
    """
    from histofm.weights import load_encoder

    cfg = config or ExtractConfig()
    check_layout(cfg.layout)
    inputs = _as_inputs(shard_slides(list(slides), rank, world_size))
    names = [s.path.stem for s in inputs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise HistofmError(f"Several slides share the name {dupes[0]!r}, so their outputs would collide; rename them.")
    if isinstance(model, str):
        model = load_encoder(model)  # refuses: no weights named
    name = _model_name(model)
    message = _preprocessing_warning(name, cfg)
    if message is not None:
        (warn or (lambda m: warnings.warn(m, UserWarning, stacklevel=3)))(message)
    device = torch.device(cfg.device) if cfg.device else default_device()
    model = model.to(device).eval()
    if cfg.channels_last:
        accel.channels_last(model)
    if cfg.compile:
        accel.compile_blocks(model)
    stain, stain_label = None, "none"
    if cfg.stain_norm is not None:
        from histofm.data.stain import make_stain_transform

        if cfg.stain_target is None:
            raise HistofmError("--stain-norm needs a target image: pass --stain-target IMAGE.")
        stain = make_stain_transform(cfg.stain_norm, cfg.stain_target)
        stain_label = f"{cfg.stain_norm.lower()}:{_file_label(cfg.stain_target)}"
    pre = _Preprocess(name, cfg.tile_size, transform, channels_last=cfg.channels_last, stain=stain,
                      stain_label=stain_label)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, "bad")
    if dtype == "bad":
        raise HistofmError(f"Unknown precision {cfg.precision!r}; choose fp32, bf16 or fp16.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # temp files of a process killed mid-write
    common = {"model_name": name, **weights_of(model).attrs(), **pre.record(), "layout": cfg.layout}

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    report = ExtractionReport()
    with _cores_for_readers(device, cfg.num_workers), Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not progress, transient=False,
    ) as bars:
        overall = bars.add_task("slides", total=len(inputs))
        slide_mpps = {s.path: s.mpp if s.mpp is not None else mpp for s in inputs}
        ahead = SelectionAhead(lambda p: _select(p, slide_mpps[p], cfg))
        try:
            for i, item in enumerate(inputs):
                start = time.perf_counter()
                after = inputs[i + 1].path if i + 1 < len(inputs) else None
                # Once this slide's readers run, the next slide's tissue detection starts beside them.
                def begin_next(after: Path | None = after) -> None:
                    if after is not None and (cfg.overwrite or not _output_exists(out_dir, after, name, cfg.layout)):
                        ahead.start(after)

                try:
                    result = _one_slide(item, mpp, model, out_dir, cfg, pre, device, dtype, common, bars, ahead,
                                        begin_next)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # one bad slide must not stop the batch
                    result = SlideResult(item.path.name, "failed", error=_one_line(e))
                result.seconds = time.perf_counter() - start if result.status == "done" else result.seconds
                report.results.append(result)
                bars.advance(overall)
        finally:
            ahead.close()
    return report


def _output_exists(out_dir: Path, path: Path, model_name: str, layout: str) -> bool:
    """Whether a slide's feature file exists (a resumed run then usually skips it: nothing to select ahead)."""
    return feature_path(out_dir, path.stem, model_name, layout).exists()


def _select(path: Path, slide_mpp: float | None, cfg: ExtractConfig) -> TileSelection:
    """The tile selection of one slide with its own handle (what :func:`_locked_slide` computes)."""
    with open_slide(path, mpp=slide_mpp, backend=cfg.backend) as slide:
        spec = tile_spec(slide, cfg.target_mpp, cfg.tile_size, cfg.overlap)
        return select_tiles(slide, spec, min_tissue=cfg.min_tissue, roi=cfg.roi, coords_dir=cfg.coords_dir)


def _tiling_provenance(slide: SlideReader, spec: TileSpec, cfg: ExtractConfig) -> dict[str, Any]:
    """The tiling and slide part of the provenance (before any tile is read)."""
    name = slide.path.stem
    if cfg.coords_dir is not None:
        tiles_from = coords_description(find_coords_file(cfg.coords_dir, name))
    else:
        tiles_from = "tissue" if cfg.min_tissue > 0 else "grid"
    return {
        "mpp": float(cfg.target_mpp), "tile_size": int(cfg.tile_size), "overlap": int(cfg.overlap),
        "min_tissue": float(cfg.min_tissue), "level": int(spec.level), "read_size": int(spec.read_size),
        "tiles_from": tiles_from, "roi": cfg.roi.describe(name) if cfg.roi is not None else "",
        "slide": slide.path.name, "slide_bytes": int(slide.path.stat().st_size), "level0_mpp": float(spec.level0_mpp),
        "slide_fingerprint": slide_fingerprint(slide.path),
    }


def _one_slide(
    item: SlideInput,
    mpp: float | None,
    model: nn.Module,
    out_dir: Path,
    cfg: ExtractConfig,
    pre: _Preprocess,
    device: torch.device,
    dtype: torch.dtype | None,
    common: dict[str, Any],
    bars: Any,
    ahead: SelectionAhead | None = None,
    begin_next: Callable[[], None] | None = None,
) -> SlideResult:
    """Check, select, embed and write one slide (skipped when another process holds its lock)."""
    path = item.path
    slide_mpp = item.mpp if item.mpp is not None else mpp
    out_path = feature_path(out_dir, path.stem, common["model_name"], cfg.layout)
    # Never open or fork while this slide's selection still runs in the background thread.
    prefetched = ahead.wait(path) if ahead is not None else None
    with slide_lock(out_path) as mine:
        if not mine:  # another live process has this slide (several extracts into one --out)
            return SlideResult(path.name, "skipped", output=out_path, note="done by another process")
        return _locked_slide(path, out_path, slide_mpp, model, out_dir, cfg, pre, device, dtype, common, bars,
                             prefetched, begin_next)


def _locked_slide(
    path: Path,
    out_path: Path,
    slide_mpp: float | None,
    model: nn.Module,
    out_dir: Path,
    cfg: ExtractConfig,
    pre: _Preprocess,
    device: torch.device,
    dtype: torch.dtype | None,
    common: dict[str, Any],
    bars: Any,
    prefetched: Future[TileSelection] | None = None,
    begin_next: Callable[[], None] | None = None,
) -> SlideResult:
    """:func:`_one_slide` once this process holds the slide's lock."""
    from histofm._version import __version__
    # Temporaries of this slide's file left by a killed run (only histofm's, of dead processes).
    remove_stale_temps(out_path)
    with open_slide(path, mpp=slide_mpp, backend=cfg.backend) as slide:
        spec = tile_spec(slide, cfg.target_mpp, cfg.tile_size, cfg.overlap)
        wanted = {**common, **_tiling_provenance(slide, spec, cfg), "histofm_version": __version__}
        state, diffs = ("absent", []) if cfg.overwrite else _resume_state(out_path, wanted, cfg.layout)
        if state == "done":
            return SlideResult(path.name, "skipped", output=out_path)
        if state == "different":
            more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            return SlideResult(
                path.name, "failed",
                error=f"{out_path.name} exists with other settings ({'; '.join(diffs[:3])}{more}); "
                "pass --overwrite to redo it or choose another --out.",
            )
        if prefetched is not None:  # computed ahead, while the previous slide was read (its errors re-raise here)
            selection = prefetched.result()
        else:
            selection = select_tiles(slide, spec, min_tissue=cfg.min_tissue, roi=cfg.roi, coords_dir=cfg.coords_dir)
        attrs = coords_attrs(spec, cfg.layout, slide, path.stem)
        backend, decoder = slide.backend, slide.decoder(spec.level)
    dim = getattr(model, "num_features", None) or getattr(model, "embed_dim", None)
    if isinstance(dim, int):  # the (N, D) float32 features and their concatenated copy, before embedding
        check_alloc(2 * 4 * dim * len(selection.coords), f"The features of {path.name} ({len(selection.coords)} tiles)",
                    "--target-mpp, --tile-size or --mpp-override")
    # Threads read where the tiles are uint8 decoded from stored tiles (no per-tile transform):
    # the decoder releases the GIL, and no process start-up or shared-memory hand-over is paid.
    threads = cfg.reader_threads and cfg.num_workers > 0 and decoder == "stored-tiles" and pre.worker_transform() is None
    features = _embed(path, selection.coords, model, cfg, pre, device, dtype, slide_mpp, backend, bars, begin_next,
                      threads)
    bad = int(np.size(features) - np.isfinite(features).sum())
    if bad:
        raise HistofmError(
            f"The encoder gave {bad} non-finite (NaN or infinite) values of {features.size} for {path.name}, so "
            "nothing was written; check the weights given with --checkpoint (or try --precision fp32)."
        )
    file_attrs = {**wanted, "embed_dim": int(features.shape[1]), "backend": backend,
                  "tile_decoder": decoder, "read_interpolation": "bilinear" if spec.read_size != spec.tile_size else "none"}
    _write(out_path, features, selection.coords, attrs, file_attrs, cfg.layout, out_dir)
    return SlideResult(path.name, "done", len(features), output=out_path)


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


def _embed(
    path: Path,
    coords: np.ndarray,
    model: nn.Module,
    cfg: ExtractConfig,
    pre: _Preprocess,
    device: torch.device,
    dtype: torch.dtype | None,
    mpp: float | None,
    backend: str,
    bars: Any,
    begin_next: Callable[[], None] | None = None,
    threads: bool = False,
) -> np.ndarray:
    """``(N, D)`` float32 embeddings of the tiles at ``coords``.

    ``begin_next`` is called once the readers exist; ``threads`` reads with ``cfg.num_workers``
    threads of this process instead of DataLoader worker processes.
    """
    def make_dataset() -> SlideTileDataset:
        return SlideTileDataset(
            [path], [coords], target_mpp=cfg.target_mpp, tile_size=cfg.tile_size,
            transform=pre.worker_transform(), mpp=mpp, backend=backend, tile_cache_bytes=_ROW_CACHE_BYTES,
        )

    dataset = make_dataset()
    # Each worker reads a contiguous band of rows (each stored tile decoded once); rows go back in order below.
    order = raster_batches(len(dataset), cfg.batch_size, cfg.num_workers)
    if threads:  # uint8 tiles decoded from stored tiles: reading threads (see histofm.wsi.threaded)
        reading = iter(ThreadedTiles(make_dataset, order, cfg.num_workers))
        batches: Iterator[Any] = ((tiles, None) for tiles in reading)
    else:
        loader = DataLoader(
            dataset, batch_sampler=order, num_workers=cfg.num_workers, collate_fn=pre.collate,
            pin_memory=device.type == "cuda", persistent_workers=False,
        )
        batches = iter(loader)  # forks the workers
    task = bars.add_task(f"  {path.name}", total=len(dataset))
    out: np.ndarray | None = None
    if begin_next is not None:
        begin_next()
    try:
        with torch.inference_mode():
            for rows, (tiles, _xy) in zip(order, batches):
                x = pre.batch(tiles, device)  # (B, 3, S, S)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    emb = model(x)  # (B, D)
                if emb.ndim != 2 or len(emb) != len(x):
                    raise HistofmError(
                        f"The model returned shape {tuple(emb.shape)} for a batch of {len(x)} tiles; "
                        "a tile encoder must return (B, D) embeddings."
                    )
                emb = emb.float().cpu()  # (B, D); copied into out below, before the input buffer is reused
                if out is None:
                    out = np.empty((len(dataset), emb.shape[1]), dtype=np.float32)  # (N, D)
                out[rows] = emb.numpy()
                bars.advance(task, len(x))
    finally:
        bars.remove_task(task)
        # After a worker error the iterator sits in a reference cycle with the exception, and its
        # garbage-collected shutdown waits 5 s per worker: stop the workers now instead.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        elif threads:
            reading.close()  # stops the reading threads and closes their readers
    assert out is not None  # a selection always holds at least one tile
    return out  # (N, D)


def _write(
    out_path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: dict[str, Any],
    file_attrs: dict[str, Any],
    layout: str,
    out_dir: Path,
) -> None:
    """Write the feature file (and CLAM's ``.pt`` first: the ``.h5`` marks the slide done), atomically."""
    import h5py

    if layout == "clam":
        with atomic_path(pt_path(out_dir, out_path.stem)) as tmp:
            torch.save(torch.from_numpy(np.ascontiguousarray(features)), tmp)  # (N, D) float32, a plain tensor
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            dset = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for key, value in coords_attrs.items():
                dset.attrs[key] = value
            for key, value in file_attrs.items():
                f.attrs[key] = np.asarray(value, dtype=np.float64) if isinstance(value, tuple) else value
