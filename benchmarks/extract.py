"""Feature-extraction throughput against the raw decoding limit, in one run.

    python benchmarks/extract.py --copies 3 --workers 2

Builds a larger slide from the bundled real Aperio sample (a ``copies x copies`` mosaic,
written as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide opens), then measures:

* **raw**: OpenSlide ``read_region`` of exactly the tiles the pipeline keeps, in a tight
  loop, split over ``--workers`` processes that each hold their own handle;
* **loader**: the pipeline's reading stage alone: the same ``SlideTileDataset`` +
  DataLoader + collate that extraction uses, every batch consumed, nothing computed
  (what a GPU would be fed; tissue detection excluded);
* **pipeline**: :func:`histofm.wsi.features.extract_features` end to end (tissue detection,
  tiling, DataLoader with the same number of workers, encoder, HDF5 file), for each encoder:
  ``pool`` (per-channel mean: the encoder is never the bottleneck) and ``vit`` (a
  ``vit_tiny_patch16_224`` cut to ``--depth`` blocks);
* **encoder**: the encoder alone on random batches (is it the bottleneck?).

It prints tiles/s for each and the ratio pipeline / raw (best of ``--repeats`` runs,
interleaved), and the same ratio in CPU time (user + system seconds of all processes per
tile), which a busy machine distorts much less than wall-clock time. The goal is >= 0.8x
when the encoder is not the bottleneck.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
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
from histofm.wsi.dataset import SlideTileDataset
from histofm.wsi.features import ExtractConfig, _Preprocess, extract_features


def build_mosaic(path: Path, copies: int) -> None:
    """A ``copies x copies`` mosaic of the real sample as a 3-level tiled JPEG TIFF at 0.499 um/px."""
    with open_slide(sample_path("cmu_small_region")) as s:
        tile = np.asarray(s.read_region((0, 0), 0, s.dimensions))
    big = np.tile(tile, (copies, copies, 1))
    h, w = big.shape[:2]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, k in enumerate((1, 4, 16)):
            img = big if k == 1 else np.asarray(Image.fromarray(big).resize((w // k, h // k), Image.Resampling.BOX))
            tw.write(img, tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=int(i > 0),
                     resolution=(1e4 / (0.499 * k),) * 2, resolutionunit="CENTIMETER")


_HANDLE = None


def _open(path: str) -> None:
    global _HANDLE
    import openslide

    torch.set_num_threads(1)
    _HANDLE = openslide.OpenSlide(path)


def _read(chunk: np.ndarray) -> int:
    for x, y in chunk:
        _HANDLE.read_region((int(x), int(y)), 0, (224, 224))
    return len(chunk)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def raw_decoding(path: Path, coords: np.ndarray, workers: int) -> tuple[float, float]:
    """``(tiles/s, CPU s/tile)`` of bare OpenSlide reads over ``workers`` processes (start-up included)."""
    chunks = np.array_split(coords, workers * 8)
    ctx = mp.get_context("fork")
    cpu, start = cpu_seconds(), time.perf_counter()
    with ctx.Pool(workers, initializer=_open, initargs=(str(path),)) as pool:
        n = sum(pool.map(_read, chunks))
        pool.close()
        pool.join()
    return n / (time.perf_counter() - start), (cpu_seconds() - cpu) / n


def loader_only(path: Path, coords: np.ndarray, workers: int, batch_size: int) -> tuple[float, float]:
    """``(tiles/s, CPU s/tile)`` of the extraction DataLoader alone (worker start-up included)."""
    pre = _Preprocess("vit_tiny_patch16_224", 224, None)  # uint8 fast path: what extraction uses
    dataset = SlideTileDataset([path], [coords])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=pre.collate)
    cpu, start = cpu_seconds(), time.perf_counter()
    n = 0
    batches = iter(loader)
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
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=3, help="mosaic side in copies of the sample")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=1, help="ViT blocks of the small encoder")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs; the best of each is reported")
    args = p.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "mosaic.tif"
        build_mosaic(slide, args.copies)
        with open_slide(slide, backend="openslide") as s:
            coords = tile_slide(s, 0.5, 224)
            print(f"slide: {s.dimensions[0]} x {s.dimensions[1]} px, {s.level_count} levels, {len(coords)} tissue tiles")

        encoders = {
            "pool": MeanPool(),
            "vit": histofm.create_model("vit_tiny_patch16_224", depth=args.depth).eval(),
        }
        cfg = ExtractConfig(batch_size=args.batch_size, num_workers=args.workers, device="cpu", overwrite=True)
        raw_rate, raw_cpu = 0.0, float("inf")
        load_rate, load_cpu = 0.0, float("inf")
        best: dict[str, tuple[float, float]] = {name: (0.0, float("inf")) for name in encoders}
        for _ in range(args.repeats):
            rate, cpu = raw_decoding(slide, coords, args.workers)
            raw_rate, raw_cpu = max(raw_rate, rate), min(raw_cpu, cpu)
            rate, cpu = loader_only(slide, coords, args.workers, args.batch_size)
            load_rate, load_cpu = max(load_rate, rate), min(load_cpu, cpu)
            for name, model in encoders.items():
                cpu0, start = cpu_seconds(), time.perf_counter()
                report = extract_features([slide], model, Path(tmp) / f"out_{name}", config=cfg, progress=False)
                wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
                assert not report.failures, report.failures[0].error
                best[name] = (max(best[name][0], report.tiles / wall), min(best[name][1], cpu / report.tiles))
        print(f"raw OpenSlide read_region, {args.workers} workers: {raw_rate:8.1f} tiles/s, "
              f"{raw_cpu * 1e3:.2f} ms CPU/tile")
        print(f"loader (reading stage only):        {load_rate:8.1f} tiles/s, {load_cpu * 1e3:.2f} ms CPU/tile; "
              f"ratio to raw decoding: {load_rate / raw_rate:.2f}x wall-clock, {raw_cpu / load_cpu:.2f}x CPU time")
        for name, model in encoders.items():
            rate, cpu = best[name]
            print(
                f"pipeline [{name:4s}]: {rate:8.1f} tiles/s end to end, {cpu * 1e3:.2f} ms CPU/tile "
                f"(encoder alone {encoder_only(model, args.batch_size):.0f} tiles/s); ratio to raw decoding: "
                f"{rate / raw_rate:.2f}x wall-clock, {raw_cpu / cpu:.2f}x CPU time"
            )


if __name__ == "__main__":
    main()
