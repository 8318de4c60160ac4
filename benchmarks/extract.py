"""Feature-extraction throughput against the raw decoding limit, in one run.

    python benchmarks/extract.py --copies 3 --workers 2

Builds a larger slide from the bundled real Aperio sample (a ``copies x copies`` mosaic,
written as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide opens), then measures:

* **raw**: OpenSlide ``read_region`` of exactly the tiles the pipeline keeps, in a tight
  loop, split over ``--workers`` processes that each hold their own handle;
* **pipeline**: :func:`histofm.wsi.features.extract_features` end to end (tissue detection,
  tiling, DataLoader with the same number of workers, encoder, HDF5 file), for each encoder:
  ``pool`` (per-channel mean: the encoder is never the bottleneck) and ``vit`` (a
  ``vit_tiny_patch16_224`` cut to ``--depth`` blocks);
* **encoder**: the encoder alone on random batches (is it the bottleneck?).

It prints tiles/s for each and the ratio pipeline / raw. The goal is >= 0.8x when the
encoder is not the bottleneck.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch import nn

import histofm
from histofm.data import sample_path
from histofm.wsi import open_slide, tile_slide
from histofm.wsi.features import ExtractConfig, extract_features


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


def raw_decoding(path: Path, coords: np.ndarray, workers: int) -> float:
    """Tiles/s of bare OpenSlide reads over ``workers`` processes (pool start-up excluded)."""
    chunks = np.array_split(coords, workers * 8)
    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_open, initargs=(str(path),)) as pool:
        pool.map(_read, [c[:1] for c in chunks[:workers]])  # warm the handles
        start = time.perf_counter()
        n = sum(pool.map(_read, chunks))
        return n / (time.perf_counter() - start)


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
    args = p.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "mosaic.tif"
        build_mosaic(slide, args.copies)
        with open_slide(slide, backend="openslide") as s:
            coords = tile_slide(s, 0.5, 224)
            print(f"slide: {s.dimensions[0]} x {s.dimensions[1]} px, {s.level_count} levels, {len(coords)} tissue tiles")

        raw = raw_decoding(slide, coords, args.workers)
        print(f"raw OpenSlide read_region, {args.workers} workers: {raw:8.1f} tiles/s")

        encoders = {
            "pool": MeanPool(),
            "vit": histofm.create_model("vit_tiny_patch16_224", depth=args.depth).eval(),
        }
        cfg = ExtractConfig(batch_size=args.batch_size, num_workers=args.workers, device="cpu")
        for name, model in encoders.items():
            alone = encoder_only(model, args.batch_size)
            out = Path(tmp) / f"out_{name}"
            start = time.perf_counter()
            report = extract_features([slide], model, out, config=cfg, progress=False)
            wall = time.perf_counter() - start
            assert not report.failures, report.failures[0].error
            rate = report.tiles / wall
            print(
                f"pipeline [{name:4s}]: {rate:8.1f} tiles/s end to end ({report.tiles} tiles in {wall:.1f} s, "
                f"encoder alone {alone:.0f} tiles/s)  ratio to raw decoding: {rate / raw:.2f}x"
            )


if __name__ == "__main__":
    main()
