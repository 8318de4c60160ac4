"""Feature-extraction throughput against naive per-tile decoding, for a 20x and a 40x slide, in one run.

    python benchmarks/extract.py --copies 6 --workers 2 --repeats 3

Builds slides from the bundled real Aperio sample (a ``copies x copies`` mosaic written as a
tiled, JPEG-compressed pyramidal TIFF of 256 px tiles that OpenSlide opens), one per kind:

* ``20x``: the real pixels at 0.499 um/px, levels 1x / 4x / 16x, read at 0.5 um/px from level 0;
* ``40x+2x``: the real pixels upsampled 2x (bicubic) and labelled 0.25 um/px, levels
  1x / 2x / 8x / 32x: read at 0.5 um/px from the 2x level;
* ``40x``: the same 40x pixels with levels 1x / 4x / 16x (what Aperio writes): 448 px read
  at level 0 and resized to 224 px (bilinear).

For each kind it measures, on the same tissue tiles, interleaved ``--repeats`` times (best of
each reported):

* **naive**: OpenSlide ``read_region`` of each tile's region at the level the pipeline reads,
  resized (``convert("RGB").resize``, bilinear) only where the level does not give 224 px
  directly; one call per tile in a tight loop over ``--workers`` processes that each hold
  their own handle, each process taking one contiguous run of tiles (OpenSlide's own tile
  cache then helps it too);
* **loader**: the extraction's reading stage alone, every batch consumed, nothing computed (what
  a GPU is fed): ``--workers`` reader threads (:mod:`histofm.wsi.threaded`) where the level is
  decoded from its stored tiles, as extraction does, else ``SlideTileDataset`` + DataLoader with
  ``--workers`` worker processes;
* **pipeline**: :func:`histofm.wsi.features.extract_features` end to end (tissue detection,
  tiling, loader, normalisation, encoder, HDF5 file) with a per-channel-mean encoder (``pool``,
  never the bottleneck) and, for the 20x slide, a ``vit_tiny_patch16_224`` cut to ``--depth``
  blocks (``vit``).

It prints tiles/s and CPU ms per tile (user + system of every process, workers included) and
the ratio to naive decoding in both: wall-clock (distorted on a busy machine) and CPU time (the
trustworthy one there). The goal is >= 1.0x for the ``pool`` pipeline.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import histofm
from histofm.data import sample_path
from histofm.wsi import open_slide, tile_slide
from histofm.wsi.dataset import SlideTileDataset, raster_batches
from histofm.wsi.features import ExtractConfig, _Preprocess, extract_features, read_provenance
from histofm.wsi.threaded import ThreadedTiles

TILE = 224
TARGET_MPP = 0.5
# kind: (microns per pixel of level 0, upsampling of the real pixels, level downsamples)
KINDS = {
    "20x": (0.499, 1, (1, 4, 16)),
    "40x+2x": (0.25, 2, (1, 2, 8, 32)),
    "40x": (0.25, 2, (1, 4, 16)),
}


def _sample() -> np.ndarray:
    with open_slide(sample_path("cmu_small_region")) as s:
        return s.read_region_array((0, 0), 0, s.dimensions)  # (2967, 2220, 3)


def _mosaic_tiles(image: np.ndarray, copies: int, tile: int) -> Iterator[np.ndarray]:
    """The tiles (row-major, edges padded) of ``image`` repeated ``copies x copies`` times, never all in memory."""
    h, w = image.shape[:2]
    height, width = copies * h, copies * w
    cols = -(-width // tile)
    for top in range(0, height, tile):
        rows = np.arange(top, top + tile) % h
        strip = image[rows]  # (tile, w, 3)
        strip = np.tile(strip, (1, -(-(cols * tile) // w), 1))[:, : cols * tile]  # (tile, cols * tile, 3)
        for c in range(cols):
            yield strip[:, c * tile : (c + 1) * tile]


def build_slide(path: Path, copies: int, kind: str) -> None:
    """A ``copies x copies`` mosaic of the real sample as a tiled JPEG pyramid (see the module docstring)."""
    mpp, up, levels = KINDS[kind]
    base = _sample()
    if up > 1:
        h, w = base.shape[:2]
        base = np.asarray(Image.fromarray(base).resize((w * up, h * up), Image.Resampling.BICUBIC))
    h, w = base.shape[:2]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, k in enumerate(levels):
            img = base if k == 1 else np.asarray(Image.fromarray(base).resize((w // k, h // k), Image.Resampling.BOX))
            shape = (copies * img.shape[0], copies * img.shape[1], 3)
            tw.write(_mosaic_tiles(img, copies, 256), shape=shape, dtype=np.uint8, tile=(256, 256), photometric="rgb",
                     compression="jpeg", subfiletype=int(i > 0), resolution=(1e4 / (mpp * k),) * 2,
                     resolutionunit="CENTIMETER")


_HANDLE = None
_GEOMETRY = (0, TILE)


def _open(path: str, level: int, read_size: int) -> None:
    global _HANDLE, _GEOMETRY
    import openslide

    torch.set_num_threads(1)
    _HANDLE = openslide.OpenSlide(path)
    _GEOMETRY = (level, read_size)


def _read(chunk: np.ndarray) -> int:
    level, read_size = _GEOMETRY
    for x, y in chunk:
        region = _HANDLE.read_region((int(x), int(y)), level, (read_size, read_size))
        if read_size != TILE:  # what a user does: the region, then a resize
            region.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR)
    return len(chunk)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def naive_decoding(path: Path, coords: np.ndarray, workers: int, level: int, read_size: int) -> tuple[float, float]:
    """``(tiles/s, CPU s/tile)`` of one OpenSlide ``read_region`` per tile over ``workers`` processes."""
    chunks = np.array_split(coords, workers)  # one contiguous run each (OpenSlide's tile cache helps)
    ctx = mp.get_context("fork")
    cpu, start = cpu_seconds(), time.perf_counter()
    with ctx.Pool(workers, initializer=_open, initargs=(str(path), level, read_size)) as pool:
        n = sum(pool.map(_read, chunks, chunksize=1))
        pool.close()
        pool.join()
    return n / (time.perf_counter() - start), (cpu_seconds() - cpu) / n


def loader_only(path: Path, coords: np.ndarray, workers: int, batch_size: int, threads: bool) -> tuple[float, float]:
    """``(tiles/s, CPU s/tile)`` of extraction's reading stage alone (start-up included): reader threads
    where extraction uses them (``threads``), else the DataLoader with worker processes."""
    pre = _Preprocess("vit_tiny_patch16_224", TILE, None)  # uint8 fast path: what extraction uses

    def make() -> SlideTileDataset:
        return SlideTileDataset([path], [coords], target_mpp=TARGET_MPP, tile_size=TILE)

    order = raster_batches(len(coords), batch_size, workers)
    cpu, start = cpu_seconds(), time.perf_counter()
    n = 0
    if threads:
        for tiles in ThreadedTiles(make, order, workers):
            n += len(tiles)
    else:
        batches = iter(DataLoader(make(), batch_sampler=order, num_workers=workers, collate_fn=pre.collate))
        for tiles, _xy in batches:
            n += len(tiles)
        del batches  # joins the workers, so their CPU time is counted
    return n / (time.perf_counter() - start), (cpu_seconds() - cpu) / n


class MeanPool(nn.Module):
    """The cheapest possible encoder: the mean of each colour channel."""

    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, 3)


def encoder_only(model: nn.Module, batch: int, repeats: int = 3) -> float:
    x = torch.randn(batch, 3, TILE, TILE)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return batch * repeats / (time.perf_counter() - start)


def _best(old: tuple[float, float], new: tuple[float, float]) -> tuple[float, float]:
    return max(old[0], new[0]), min(old[1], new[1])


def measure(kind: str, tmp: Path, args: argparse.Namespace, encoders: dict[str, nn.Module]) -> None:
    slide = tmp / f"slide_{kind}.tif"
    start = time.perf_counter()
    build_slide(slide, args.copies, kind)
    with open_slide(slide, backend="openslide") as s:
        coords = tile_slide(s, TARGET_MPP, TILE)
        level, read_size, _ = s.tile_geometry(TARGET_MPP, TILE)
        decoder = s.decoder(level)
        threads = decoder == "stored-tiles" and args.workers > 0  # what extraction does (reader_threads=True)
        print(f"\n[{kind}] {s.dimensions[0]} x {s.dimensions[1]} px at {s.mpp:g} um/px, levels "
              f"{'/'.join(f'{d:g}' for d in s.level_downsamples)}; {len(coords)} tissue tiles of {TILE} px at "
              f"{TARGET_MPP} um/px read as {read_size} px at level {level} (decoder: {decoder}, "
              f"{'reader threads' if threads else 'DataLoader worker processes'}); "
              f"built in {time.perf_counter() - start:.0f} s")
    names = [n for n in encoders if n == "pool" or kind == "20x"]
    cfg = ExtractConfig(target_mpp=TARGET_MPP, tile_size=TILE, batch_size=args.batch_size, num_workers=args.workers,
                        device="cpu", overwrite=True)
    naive = load = (0.0, float("inf"))
    best = {name: (0.0, float("inf")) for name in names}
    for _ in range(args.repeats):
        naive = _best(naive, naive_decoding(slide, coords, args.workers, level, read_size))
        load = _best(load, loader_only(slide, coords, args.workers, args.batch_size, threads))
        for name in names:
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            report = extract_features([slide], encoders[name], tmp / f"out_{kind}_{name}", config=cfg, progress=False)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            assert not report.failures, report.failures[0].error
            best[name] = _best(best[name], (report.tiles / wall, cpu / report.tiles))
    used = read_provenance(report.results[0].output)
    rows = [("naive OpenSlide read_region", naive), ("loader (reading stage)", load)]
    rows += [(f"pipeline [{name}]", best[name]) for name in names]
    print(f"{'stage':30s} {'tiles/s':>9s} {'CPU ms/tile':>12s} {'vs naive (wall)':>16s} {'vs naive (CPU)':>15s}")
    for label, (rate, cpu) in rows:
        print(f"{label:30s} {rate:9.1f} {cpu * 1e3:12.2f} {rate / naive[0]:15.2f}x {naive[1] / cpu:14.2f}x")
    print(f"(feature file: level {used['level']}, read_size {used['read_size']}; "
          + ", ".join(f"{n} encoder alone {encoder_only(encoders[n], args.batch_size):.0f} tiles/s" for n in names) + ")")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=4, help="mosaic side in copies of the sample")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=1, help="ViT blocks of the small encoder (0: no ViT row)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs; the best of each is reported")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated slide kinds: {', '.join(KINDS)}")
    args = p.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        p.error(f"unknown slide kind {unknown[0]!r}; choose from {', '.join(KINDS)}")

    torch.manual_seed(0)
    encoders: dict[str, nn.Module] = {"pool": MeanPool()}
    if args.depth > 0:
        encoders["vit"] = histofm.create_model("vit_tiny_patch16_224", depth=args.depth).eval()
    print(f"histofm {histofm.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; {args.workers} workers, batch {args.batch_size}, "
          f"best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            measure(kind, Path(tmp), args, encoders)
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
