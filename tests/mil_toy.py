"""A tiny MIL cohort for the reliability, resume and fuzz tests: 12 slides, 9 tiles of 4-d features each."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np

D = 4
TILE = 224
PROVENANCE = {"model_name": "toy_encoder", "mpp": 0.5, "tile_size": TILE, "overlap": 0, "embed_dim": D}


def write_slide(path: Path, positive: bool, rng: np.random.Generator, feats: np.ndarray | None = None) -> None:
    """A features file whose 3 x 3 tiles lie inside the bundled ``cmu_small_region`` slide."""
    xs = np.arange(3) * TILE
    coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2).astype(np.int64)  # (9, 2)
    if feats is None:
        feats = rng.normal(size=(len(coords), D)).astype(np.float32)
        if positive:
            feats[:3, 0] += 3.0
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        dset = f.create_dataset("coords", data=coords)
        dset.attrs["patch_size_level0"] = TILE
        for k, v in {**PROVENANCE, "slide": f"{path.stem}.svs", "level0_mpp": 0.5}.items():
            f.attrs[k] = v


def make_cohort(root: Path, n: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """``root/features/S00.h5 ...`` and ``root/labels.csv`` (one patient per slide, alternating labels)."""
    feats = root / "features"
    feats.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "tumour" if i % 2 else "normal"
        write_slide(feats / f"S{i:02d}.h5", label == "tumour", rng)
        rows.append([f"S{i:02d}", label, f"P{i:02d}"])
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "label", "patient_id"], *rows])
    return feats, labels
