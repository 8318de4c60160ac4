"""Pretraining input throughput: shard streaming vs an image folder vs reading slides on the fly, in one run.

    python benchmarks/streaming.py --copies 8 --workers 2 --repeats 3

Copies the bundled real Aperio slide ``--copies`` times, then prepares the same tissue tiles
(``--tile-size`` px at ``--target-mpp``) three ways and reads each, every tile once, as uint8
tensors ``(B, 3, S, S)`` through a DataLoader with the same ``--workers`` and ``--batch``:

* **shards**: ``histofm shard``'s WebDataset tars streamed by :class:`histofm.data.shards.ShardStream`
  (the engine's step-stream path: seeded shuffle buffer, order planned from ``index.json``);
* **folder**: the same JPEG bytes as one file per tile, read by
  :class:`histofm.data.datasets.ImageFolderTiles` (what a tile dump on a file system gives);
* **slides**: :func:`histofm.data.datasets.slide_tiles`, what ``pretrain --data slides/`` does:
  tissue detection and tiling of every slide at start-up (timed as ``start-up``), then OpenSlide
  ``read_region`` per tile.

Prints tiles/s (wall clock, best of ``--repeats``, interleaved), CPU ms per tile (user + system of
this process and its workers; a busy machine distorts it far less), and ratios to the folder.
Writing the shards is a one-time cost, printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from histofm.data import sample_path
from histofm.data.datasets import ImageFolderTiles, slide_tiles
from histofm.data.shards import ShardSettings, ShardStream, write_shards


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _to_tensor(image) -> torch.Tensor:  # noqa: ANN001
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # (3, S, S) uint8


def _collate(items: list) -> torch.Tensor:
    return torch.stack([_to_tensor(x) for x in items])


def _consume(loader) -> int:  # noqa: ANN001
    n = 0
    for batch in loader:
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch  # a stream yields (batch, keys)
        n += batch.shape[0]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=8, help="copies of the bundled slide")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (all three paths)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slides = []
        for i in range(args.copies):
            dst = root / "slides" / f"slide{i:03d}.svs"
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(sample_path("cmu_small_region"), dst)
            slides.append(dst)
        t0, c0 = time.perf_counter(), _cpu()
        index = write_shards(slides, root / "shards", ShardSettings(
            target_mpps=(args.target_mpp,), tile_size=args.tile_size, shard_size=args.shard_size), progress=False)
        write_s, write_cpu = time.perf_counter() - t0, _cpu() - c0
        n = index["samples"]
        stream = ShardStream(root / "shards", buffer_size=256)
        folder = root / "folder"
        folder.mkdir()
        for i in range(n):  # the same JPEG bytes, one file per tile
            (folder / f"{i:09d}.jpg").write_bytes(stream.read_sample(i)[0])
        steps = n // args.batch

        def run_shards() -> int:
            stream.plan_steps(seed=0, global_batch=args.batch, num_workers=args.workers, stop_step=steps)
            return _consume(DataLoader(stream, batch_size=None, num_workers=args.workers))

        def run_folder() -> int:
            ds = ImageFolderTiles(folder)
            return _consume(DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                       collate_fn=_collate, drop_last=True))

        startup: list[tuple[float, float]] = []

        def run_slides() -> int:
            t, c = time.perf_counter(), _cpu()
            ds = slide_tiles(slides, tile_size=args.tile_size, target_mpp=args.target_mpp)
            startup.append((time.perf_counter() - t, _cpu() - c))
            return _consume(DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                       collate_fn=_collate, drop_last=True))

        paths = {"shards": run_shards, "folder": run_folder, "slides": run_slides}
        best: dict[str, tuple[float, float]] = {k: (0.0, float("inf")) for k in paths}  # tiles/s, CPU ms/tile
        for _ in range(args.repeats):
            for name, fn in paths.items():  # interleaved: load changes hit all three alike
                t, c = time.perf_counter(), _cpu()
                tiles = fn()
                wall, cpu = time.perf_counter() - t, _cpu() - c
                rate, ms = tiles / wall, 1e3 * cpu / tiles
                best[name] = (max(best[name][0], rate), min(best[name][1], ms))
                if name == "slides":  # the reading alone, without the start-up
                    su_wall, su_cpu = startup[-1]
                    rate, ms = tiles / (wall - su_wall), 1e3 * (cpu - su_cpu) / tiles
                    old = best.get("slides, reading only", (0.0, float("inf")))
                    best["slides, reading only"] = (max(old[0], rate), min(old[1], ms))

    print(f"{n} tissue tiles of {args.tile_size} px at {args.target_mpp} um/px from {args.copies} slides, "
          f"{len(index['shards'])} shards; {args.workers} workers, batch {args.batch}; best of {args.repeats}")
    print(f"writing the shards (once): {write_s:.1f} s wall, {1e3 * write_cpu / n:.2f} CPU ms/tile")
    print(f"slides start-up (tissue detection + tiling, every run): {min(w for w, _ in startup):.2f} s wall, "
          f"{min(c for _, c in startup):.2f} s CPU")
    print(f"{'path':22} {'tiles/s':>9} {'CPU ms/tile':>12} {'vs folder (wall)':>17} {'vs folder (CPU)':>16}")
    fr, fc = best["folder"]
    for name, (rate, ms) in best.items():
        print(f"{name:22} {rate:9.0f} {ms:12.2f} {rate / fr:16.2f}x {fc / ms:15.2f}x")
    print(json.dumps({k: {"tiles_per_s": round(v[0], 1), "cpu_ms_per_tile": round(v[1], 3)} for k, v in best.items()}))


if __name__ == "__main__":
    main()
