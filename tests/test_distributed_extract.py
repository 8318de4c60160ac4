"""`torchrun -m histofm extract` with two gloo processes equals one process, with one summary."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from safetensors.torch import save_file

import histofm
from histofm.data import sample_path


def _args(slides: list[Path], ckpt: Path, out: Path) -> list[str]:
    return [
        "-m", "histofm", "extract", *map(str, slides), "--model", "vit_tiny_patch16_224", "--checkpoint", str(ckpt),
        "--out", str(out), "--tile-size", "112", "--target-mpp", "2.0", "--batch-size", "8", "--workers", "0",
        "--no-progress", "--device", "cpu", "--layout", "flat",
    ]


def test_sharded_extraction_equals_unsharded(tmp_path: Path) -> None:
    slides = []
    for i in range(3):
        dst = tmp_path / f"s{i}.svs"
        shutil.copy(sample_path("cmu_small_region"), dst)
        slides.append(dst)
    ckpt = tmp_path / "tiny.safetensors"
    save_file(histofm.create_model("vit_tiny_patch16_224").state_dict(), ckpt)

    single = subprocess.run([sys.executable, *_args(slides, ckpt, tmp_path / "one")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *_args(slides, ckpt, tmp_path / "two")],
        capture_output=True, text=True, timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.count("3 slides: 3 done") == 1, multi.stdout  # one summary for the whole job
    for s in slides:
        with h5py.File(tmp_path / "one" / f"{s.stem}.h5") as a, h5py.File(tmp_path / "two" / f"{s.stem}.h5") as b:
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
            np.testing.assert_allclose(a["features"][:], b["features"][:], rtol=1e-5, atol=1e-5)
