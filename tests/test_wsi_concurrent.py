"""Several `histofm extract` processes on one --out share the slides; non-finite features are refused.

Three processes start together on the same six slides and the same ``--out`` holding user
files (hidden ``.tmp`` ones included): each slide is embedded exactly once, nobody fails,
every process exits 0, the user's files are untouched, and no lock or temporary file is left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import histofm
from histofm.cli import main
from histofm.data import sample_path

USER_FILES = {".notes.tmp": b"mine", ".s0.h5.tmp": b"mine", "s0.h5.tmp": b"mine", "README.txt": b"keep"}
MODEL = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    image = Image.open(sample_path("hgsc_nest")).convert("RGB")
    slides = []
    for i in range(6):  # 448 x 448 px at 0.5 um/px: 4 tiles of 224 px at 1 um/px
        path = root / f"s{i}.png"
        image.crop((i * 150, i * 150, i * 150 + 448, i * 150 + 448)).save(path)
        slides.append(path)
    model = histofm.create_model(MODEL)
    ckpt = root / "tiny.safetensors"
    save_file(model.state_dict(), ckpt)
    nan_ckpt = root / "nan.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}, nan_ckpt)
    return root, slides, ckpt, nan_ckpt


def _args(slides: list[Path], ckpt: Path, out: Path) -> list[str]:
    return [
        "extract", *map(str, slides), "--model", MODEL, "--checkpoint", str(ckpt), "--out", str(out),
        "--mpp-override", "0.5", "--target-mpp", "1.0", "--tile-size", "112", "--min-tissue", "0",
        "--batch-size", "4", "--workers", "0", "--no-progress", "--layout", "flat", "--device", "cpu",
    ]


def test_concurrent_extracts_share_the_slides(setup, tmp_path: Path) -> None:
    root, slides, ckpt, _ = setup
    out = tmp_path / "out"
    out.mkdir()
    for name, data in USER_FILES.items():
        (out / name).write_bytes(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(histofm.__file__).parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-m", "histofm", *_args(slides, ckpt, out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    done = 0
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert "Traceback" not in stderr and "error" not in stderr
        m = re.search(r"6 slides: (\d+) done, (\d+) skipped.*, 0 failed", stdout)
        assert m, stdout
        done += int(m[1])
    assert done == len(slides)  # every slide embedded once, by one of the processes
    assert {n: (out / n).read_bytes() for n in USER_FILES} == USER_FILES
    made = sorted(f.name for f in out.iterdir() if f.name not in USER_FILES)
    assert made == sorted(f"{s.stem}.h5" for s in slides)  # no lock, no temporary left
    mask = os.umask(0)
    os.umask(mask)
    for s in slides:
        assert (out / f"{s.stem}.h5").stat().st_mode & 0o777 == 0o666 & ~mask  # 0644 under umask 022
        with h5py.File(out / f"{s.stem}.h5", "r") as f:
            assert f["features"].shape == (4, 192) and np.isfinite(f["features"][:]).all()


def test_nan_weights_are_refused_naming_the_slide(setup, tmp_path: Path, capsys) -> None:
    _, slides, _, nan_ckpt = setup
    out = tmp_path / "out"
    assert main(_args(slides[:1], nan_ckpt, out)) == 2
    err = capsys.readouterr().err
    assert "s0.png" in err and "non-finite" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, no lock left


def test_cluster_refuses_non_finite_embeddings(setup, tmp_path: Path, capsys) -> None:
    _, slides, _, _ = setup
    feats = tmp_path / "s0.h5"
    with h5py.File(feats, "w") as f:
        f["features"] = np.full((4, 8), np.nan, np.float32)
        f["coords"] = np.array([[0, 0], [224, 0], [0, 224], [224, 224]], np.int64)
    out = tmp_path / "maps"
    code = main(["cluster", str(slides[0]), "--features", str(feats), "--k", "2", "--mpp-override", "0.5",
                 "--out", str(out)])
    assert code == 2
    assert "non-finite" in capsys.readouterr().err
    assert not out.exists()  # refused before anything is written
