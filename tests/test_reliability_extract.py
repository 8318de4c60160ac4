"""Kill -9 during `histofm extract`, then rerun: no partial files, same outputs as one clean run.

The user's own files in --out (hidden .tmp ones too) survive every run.
Kill points: during start-up, right after the first slide's file appears, half-way through writing
the second slide's HDF5 file (made exact by a wrapper whose ``h5py.File`` stalls after the features
are written), and at two seeded random moments within the length of a clean run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import save_file

import histofm
from histofm.data import sample_path

# The CLI, with the Nth HDF5 file stalling once its features are written: argv = [n, marker, *cli_args].
STALLING_CLI = """
import sys, time, h5py
n, marker = int(sys.argv[1]), sys.argv[2]
opened, real = [0], h5py.File
class File(real):
    def __init__(self, name, mode="r", *a, **k):
        super().__init__(name, mode, *a, **k)
        self._stall = mode == "w" and (opened.__setitem__(0, opened[0] + 1) or opened[0] == n)
    def create_dataset(self, key, *a, **k):
        out = super().create_dataset(key, *a, **k)
        if self._stall and key == "features":
            self.flush()
            open(marker, "w").close()
            time.sleep(600)
        return out
h5py.File = File
from histofm.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _cmd(slides: list[Path], ckpt: Path, out: Path, stall: tuple[int, Path] | None = None) -> list[str]:
    head = [sys.executable, "-m", "histofm"] if stall is None else [sys.executable, "-c", STALLING_CLI,
                                                                     str(stall[0]), str(stall[1])]
    return [
        *head, "extract", *map(str, slides), "--model", "vit_tiny_patch16_224",
        "--checkpoint", str(ckpt), "--out", str(out), "--tile-size", "112", "--target-mpp", "2.0",
        "--batch-size", "8", "--workers", "0", "--no-progress", "--layout", "flat",
    ]


# Files of the user in --out: histofm must leave them alone, ".tmp" or not.
USER_FILES = {".notes.tmp": b"mine", ".slide0.h5.stale.tmp": b"also mine", "slide0.h5.tmp": b"mine too"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _outputs(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    result = {}
    for f in sorted(out.iterdir()):
        if f.name in USER_FILES:
            continue
        assert f.suffix == ".h5" and not f.name.startswith("."), f"stray file {f.name}"
        with h5py.File(f, "r") as h:
            result[f.name] = (h["features"][:], h["coords"][:])
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    slides = []
    for i in range(2):
        dst = root / f"slide{i}.svs"
        shutil.copy(sample_path("cmu_small_region"), dst)
        slides.append(dst)
    ckpt = root / "tiny.safetensors"
    save_file(histofm.create_model("vit_tiny_patch16_224").state_dict(), ckpt)
    ref = root / "ref"
    t0 = time.monotonic()
    proc = subprocess.run(_cmd(slides, ckpt, ref), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return slides, ckpt, _outputs(ref), time.monotonic() - t0


def _first_output(out: Path) -> bool:
    return out.exists() and any(f.suffix == ".h5" and not f.name.startswith(".") for f in out.iterdir())


@pytest.mark.parametrize(
    "kill_point", ["during start-up", "after the first slide", "writing the second file", "random 0", "random 1"]
)
def test_kill_then_rerun_equals_clean_run(setup, tmp_path: Path, kill_point: str) -> None:
    slides, ckpt, ref, clean_seconds = setup
    out = tmp_path / "out"
    out.mkdir()
    # A temp file left by an earlier crash (histofm's pattern, a dead pid) must be cleaned, not mistaken
    # for output; the user's own files, hidden ".tmp" ones included, must survive untouched.
    (out / f".slide0.h5.histofm-{_dead_pid()}-stale000.tmp").write_bytes(b"half a file")
    for name, data in USER_FILES.items():
        (out / name).write_bytes(data)
    marker = tmp_path / "stalled"
    stall = (2, marker) if kill_point == "writing the second file" else None
    proc = subprocess.Popen(_cmd(slides, ckpt, out, stall), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    if kill_point == "during start-up":
        time.sleep(0.5)
    elif kill_point.startswith("random"):
        time.sleep(random.Random(int(kill_point.split()[1])).uniform(0.5, clean_seconds))
    else:
        done = (lambda: marker.exists()) if stall else (lambda: _first_output(out))
        while not done() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if stall:
        assert marker.exists(), "the wrapper never reached the second file's write"
        # killed mid-write: the half-written file is a hidden temporary, and the first slide is complete
        assert any(f.name.startswith(".slide1.h5.histofm-") and f.name.endswith(".tmp") for f in out.iterdir())
        assert sum(f.suffix == ".h5" and not f.name.startswith(".") for f in out.iterdir()) == 1
    # Whatever the kill left must be complete files only (temp files are hidden and cleaned on rerun,
    # a lock of the killed process is broken by the rerun).
    if out.exists():
        for f in out.iterdir():
            if f.suffix == ".h5" and not f.name.startswith("."):
                with h5py.File(f, "r") as h:
                    assert h["features"].shape[0] == h["coords"].shape[0] > 0
    rerun = subprocess.run(_cmd(slides, ckpt, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    got = _outputs(out)
    assert {name: (out / name).read_bytes() for name in USER_FILES} == USER_FILES
    assert sorted(got) == sorted(ref)
    for name, (feats, coords) in ref.items():
        np.testing.assert_array_equal(got[name][1], coords)
        np.testing.assert_allclose(got[name][0], feats, rtol=1e-5, atol=1e-5)
