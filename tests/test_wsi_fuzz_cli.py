"""Property-based fuzz test (hypothesis) of `histofm tile`, `extract` and `cluster` over their flags.

Each example gives every flag a valid value except, most of the time, one flag that gets an
invalid or extreme one (the oracle: which values are invalid is decided here, not by the code
under test). For every example:

* no traceback: the command returns an exit code or argparse exits; nothing else escapes;
* an invalid value gives a non-zero exit and one error line (one sentence);
* all-valid flags give exit 0, and every feature / coordinate file written is finite;
* no file outside ``--out`` is created, changed or removed (the user's ``.tmp`` files included).

``HISTOFM_FUZZ_EXAMPLES`` scales the number of examples (default: a bounded CI run).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import histofm
from histofm.cli import main
from histofm.data import sample_path

SCALE = float(os.environ.get("HISTOFM_FUZZ_EXAMPLES", "1"))
MODEL = "vit_tiny_patch16_224"
NAN = float("nan")


@pytest.fixture(scope="module")
def world():
    """A folder with a slide, slide lists, checkpoints, a feature file and the user's own files."""
    root = Path(tempfile.mkdtemp(prefix="histofm-fuzz-"))
    Image.open(sample_path("hgsc_nest")).convert("RGB").crop((300, 300, 748, 748)).save(root / "slide.png")
    (root / "list.csv").write_text("slide_path,mpp\nslide.png,0.5\n")
    (root / "blank.csv").write_text("slide_path,mpp\n,0.5\n")
    (root / "latin.csv").write_bytes("slide_path\ncafé.png\n".encode("latin-1"))
    (root / "notes.txt").write_text("not a slide")
    (root / "folder.svs").mkdir()
    (root / ".user.tmp").write_bytes(b"user")
    (root / "a_file").write_text("x")
    sd = histofm.create_model(MODEL).state_dict()
    save_file(sd, root / "good.safetensors")
    save_file({k: torch.full_like(v, NAN) for k, v in sd.items()}, root / "nan.safetensors")
    with h5py.File(root / "feats.h5", "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
        f["coords"] = np.array([[0, 0], [224, 0], [0, 224], [224, 224]], np.int64)
        f["coords"].attrs["patch_size_level0"] = 224  # TRIDENT's tile side in level-0 pixels
    with h5py.File(root / "nanfeats.h5", "w") as f:
        f["features"] = np.full((4, 8), NAN, np.float32)
        f["coords"] = np.array([[0, 0], [224, 0], [0, 224], [224, 224]], np.int64)
    yield root
    shutil.rmtree(root, ignore_errors=True)


# flag -> (valid values, invalid values); None means "flag not given". "{root}" is the world folder.
COMMON = {
    "--target-mpp": (["0.5", "1.0"], ["0", "-1", "nan", "inf", "1e-6", "1e9", "x"]),
    "--tile-size": (["112", "224"], ["0", "-3", "100000000", "1.5"]),
    "--min-tissue": (["0", "0.1"], ["-0.1", "1.5", "nan"]),
    "--mpp-override": (["0.5"], [None, "0", "-1", "1e-6", "1e6", "nan"]),
    "--out": (["{out}"], ["{root}/a_file", "{root}/a_file/sub"]),
}
SLIDES = (["{root}/slide.png", "{root}/list.csv"],
          ["{root}/missing.svs", "{root}/notes.txt", "{root}/folder.svs", "{root}/blank.csv", "{root}/latin.csv"])
FLAGS = {
    "tile": {
        **COMMON,
        "--overlap": (["0", "16"], ["-1", "224", "500"]),
        "--backend": (["auto", "image"], ["openslide", "tiffslide", "bogus"]),
        "--format": (["h5", "csv"], ["xml"]),
    },
    "extract": {
        **COMMON,
        "--overlap": (["0", "16"], ["-1", "224", "500"]),
        "--checkpoint": (["{root}/good.safetensors"], ["{root}/nan.safetensors", "{root}/slide.png",
                                                       "{root}/missing.pth"]),
        "--batch-size": (["2", "8"], ["0", "-1"]),
        "--workers": (["0"], ["-1"]),
        "--device": (["cpu"], ["cuda:7", "gpu", "mps"] if not torch.cuda.is_available() else ["cuda:99", "gpu"]),
        "--layout": (["flat", "trident", "clam"], ["other"]),
    },
    "cluster": {
        **COMMON,
        "--target-mpp": (["0.5"], COMMON["--target-mpp"][1]),  # k = 2 needs two tiles: 224 px at 1 um/px is one
        "--features": ([None, "{root}/feats.h5"], ["{root}/nanfeats.h5", "{root}/missing.h5"]),
        "--k": (["2"], ["0", "-1", "100"]),
        "--prototypes": (["2"], ["0", "-4"]),
        "--batch-size": (["4"], ["0"]),
        "--device": (["cpu"], ["gpu", "cuda:7"] if not torch.cuda.is_available() else ["gpu", "cuda:99"]),
    },
}


def _snapshot(root: Path, out: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == out or out in Path(dirpath).parents:
            dirnames.clear()
            continue
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            if p == out:
                continue
            st_ = p.stat()
            files[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns if p.is_file() else 0)
    return files


def _argv(command: str, data: st.DataObject, root: Path, out: Path) -> tuple[list[str], str | None]:
    flags = FLAGS[command]
    names = ["<slide>", *flags]
    bad = data.draw(st.sampled_from([None, None, None, *names]), label="invalid flag")
    fill = {"root": str(root), "out": str(out)}
    choices = SLIDES[bad == "<slide>"]
    if command == "cluster":  # one slide, not a list
        choices = [c for c in choices if not c.endswith("list.csv")]
    pick = data.draw(st.sampled_from(choices), label="slide")
    argv = [command, pick.format(**fill)]
    if command == "extract":
        argv += ["--model", MODEL]
    for flag, (valid, invalid) in flags.items():
        value = data.draw(st.sampled_from(invalid if flag == bad else valid), label=flag)
        if command == "cluster" and flag == "--features" and value is None:
            argv += ["--model", MODEL, "--checkpoint", f"{root}/good.safetensors"]
        if value is not None:
            argv += [flag, value.format(**fill)]
    if command != "tile":
        argv.append("--no-progress")
    if bad == "--mpp-override" and pick.endswith("list.csv") and "--mpp-override" not in argv:
        bad = None  # the list's own mpp column is enough
    return argv, bad


def _finite_outputs(out: Path) -> None:
    for f in out.rglob("*.h5"):
        with h5py.File(f, "r") as h:
            for key in ("features", "coords"):
                if key in h:
                    values = np.asarray(h[key][:], dtype=np.float64)
                    assert np.isfinite(values).all(), f"{f.name}:{key} is not finite"


def _run(command: str, data: st.DataObject, root: Path) -> None:
    out = Path(tempfile.mkdtemp(dir=root, prefix="out-")) / "o"
    argv, bad = _argv(command, data, root, out)
    before = _snapshot(root, out.parent)
    stderr, stdout = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: usage + one error line
                code = int(e.code or 0)
    finally:
        os.chdir(cwd)
    err = stderr.getvalue()
    assert "Traceback" not in err, (argv, err)
    if bad is None:
        assert code == 0, (argv, err)
    else:
        assert code != 0, (argv, bad, stdout.getvalue())
        lines = [line for line in err.splitlines() if line.startswith("histofm") and "error:" in line]
        assert len(lines) == 1 and "\n" not in lines[0].strip(), (argv, err)
        assert lines[0].split("error:", 1)[1].strip(), err
    if code == 0 and out.exists():
        _finite_outputs(out)
    assert _snapshot(root, out.parent) == before, f"files outside --out changed: {argv}"
    shutil.rmtree(out.parent, ignore_errors=True)


def _settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_settings(40)
@given(data=st.data())
def test_fuzz_tile(world, data) -> None:
    _run("tile", data, world)


@_settings(25)
@given(data=st.data())
def test_fuzz_extract(world, data) -> None:
    _run("extract", data, world)


@_settings(15)
@given(data=st.data())
def test_fuzz_cluster(world, data) -> None:
    _run("cluster", data, world)
