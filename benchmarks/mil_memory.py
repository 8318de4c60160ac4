"""Peak memory of ``histofm mil train`` on 100 and on 1,000 synthetic slides: lazy bags against loading all.

    python benchmarks/mil_memory.py                              # 100 and 1,000 slides, 400 tiles x 256-d each
    python benchmarks/mil_memory.py --slides 100,1000 --tiles 400 --dim 256 --dir /tmp/mil_mem

Writes a cohort of ``max(--slides)`` feature files once (random features with a
planted signal, as ``histofm extract`` lays them out), then runs each
measurement in a fresh Python process and reports its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* **lazy** (ours): ``histofm mil train`` through the CLI, which reads each bag
  from its HDF5 file when a step needs it (:class:`histofm.mil.data.BagDataset`);
* **eager** (the peer, what ``mil train`` did before): every bag read into memory
  first, then the same cross-validation on the in-memory list.

Both run 2 folds x ``--epochs`` epochs of ABMIL (hidden 128) with the default
validation split. The goal is lazy(1,000) / lazy(100) <= 1.2; eager grows with
the cohort (about ``slides x tiles x dim x 4`` bytes).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_cohort(root: Path, n: int, tiles: int, dim: int) -> None:
    """``root/features/S00000.h5 ...`` and ``root/labels_<k>.csv`` for the first ``k`` slides."""
    import h5py

    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    xs = np.arange(tiles) % 32 * 256
    ys = np.arange(tiles) // 32 * 256
    coords = np.stack([xs, ys], 1).astype(np.int64)
    for i in range(n):
        path = feats / f"S{i:05d}.h5"
        if path.exists():
            continue
        x = rng.standard_normal((tiles, dim), dtype=np.float32)
        if i % 2:
            x[: tiles // 20, 0] += 3.0
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 256
            f.attrs.update({"model_name": "synthetic", "mpp": 0.5, "tile_size": 256, "slide": f"S{i:05d}.svs"})


def write_labels(root: Path, k: int) -> Path:
    path = root / f"labels_{k}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "patient_id"])
        for i in range(k):
            w.writerow([f"S{i:05d}", "tumour" if i % 2 else "normal", f"P{i // 2:05d}"])
    return path


def child(root: Path, k: int, mode: str, epochs: int) -> None:
    """One measurement; prints a JSON line with the peak RSS in MiB."""
    import torch

    torch.set_num_threads(1)
    labels = root / f"labels_{k}.csv"
    out = root / f"run_{mode}_{k}"
    settings = ["--set", "hidden_dim=128", "--set", "attn_dim=64", "--set", "n_boot=200"]
    if mode == "lazy":
        from histofm.cli import main

        rc = main(["mil", "train", "--features", str(root / "features"), "--labels", str(labels), "--folds", "2",
                   "--epochs", str(epochs), "--device", "cpu", *settings, "--out", str(out)])
        assert rc == 0
    else:
        from histofm.mil.data import BagDataset, read_labels_csv
        from histofm.mil.train import MILTrainConfig
        from histofm.train.mil import cross_validate

        table = read_labels_csv(labels)
        lazy = BagDataset.from_table(root / "features", table.slide_ids)
        bags = [lazy[i] for i in range(len(lazy))]  # the whole cohort in memory
        cfg = MILTrainConfig(model="abmil", model_kwargs={"hidden_dim": 128, "attn_dim": 64}, epochs=epochs, n_boot=200)
        cross_validate(bags, table, cfg, 2, out)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    metrics = json.loads((out / "metrics.json").read_text())
    print(json.dumps({"mode": mode, "slides": k, "peak_rss_mib": peak_kib / 1024,
                      "pooled_auroc": metrics["pooled"]["auroc"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", default="100,1000", help="cohort sizes, comma-separated")
    p.add_argument("--tiles", type=int, default=400, help="tiles per slide")
    p.add_argument("--dim", type=int, default=256, help="feature dimension")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--modes", default="lazy,eager", help="lazy (ours), eager (the peer)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("--child", nargs=3, metavar=("K", "MODE", "EPOCHS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="mil_memory_"))
    if args.child:
        child(root, int(args.child[0]), args.child[1], int(args.child[2]))
        return
    sizes = [int(s) for s in args.slides.split(",")]
    print(f"writing {max(sizes)} slides of {args.tiles} x {args.dim} float32 "
          f"({max(sizes) * args.tiles * args.dim * 4 / 2**20:.0f} MiB) to {root}", flush=True)
    write_cohort(root, max(sizes), args.tiles, args.dim)
    for k in sizes:
        write_labels(root, k)
    results: dict[tuple[str, int], dict] = {}
    for mode in args.modes.split(","):
        for k in sizes:
            proc = subprocess.run([sys.executable, __file__, "--dir", str(root), "--child", str(k), mode, str(args.epochs)],
                                  capture_output=True, text=True, check=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(mode, k)] = res
            print(f"{mode:>5} {k:>5} slides: peak RSS {res['peak_rss_mib']:7.1f} MiB "
                  f"(pooled AUROC {res['pooled_auroc']:.3f})", flush=True)
    lo, hi = min(sizes), max(sizes)
    for mode in args.modes.split(","):
        if (mode, lo) in results and (mode, hi) in results:
            ratio = results[(mode, hi)]["peak_rss_mib"] / results[(mode, lo)]["peak_rss_mib"]
            goal = " (goal <= 1.2)" if mode == "lazy" else ""
            print(f"{mode}: peak RSS {hi} / {lo} slides = {ratio:.2f}x{goal}")
    if ("eager", hi) in results and ("lazy", hi) in results:
        print(f"{hi} slides: eager / lazy = {results[('eager', hi)]['peak_rss_mib'] / results[('lazy', hi)]['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
