"""Property-based fuzz (hypothesis) of the sub-commands the other fuzz files leave out.

Covered here: ``eval nuclei``, ``zeroshot``, ``segment``, ``shard``, ``slide-embed``, ``models``,
``env``, ``demo`` and ``mil list``. :data:`FUZZ_FILES` names, in one place, the fuzz file of
EVERY sub-command of :func:`histofm.cli.build_parser`, and a meta-test checks that none is missing.

Each example starts from a small valid command line and then either

* gives one flag a value from that flag's invalid pool (the oracle: invalidity is decided here,
  not by the code under test): the run must exit non-zero with one ``histofm: error:`` line; or
* gives one flag a "wild" value drawn from the parser itself (its ``type``, ``choices`` and
  ``nargs``) mixed with hostile values (negative, zero, nan, inf, huge, empty, a file where a
  folder is expected, a non-UTF-8 file, a missing path): no verdict is imposed on the exit code,
  but the properties below must hold; or
* changes nothing: the run must exit 0.

Always: no traceback (nothing escapes ``main``), a failure prints exactly one error line, an
exit 0 leaves only finite numbers in the outputs, and no file outside ``--out`` is created,
changed or removed.

Valid runs are kept tiny (depth-1 or depth-3 random encoders on 128-px images). Where a valid
run is inherently heavy it is not fuzzed: ``demo`` (minutes) always gets one invalid flag, and
``zeroshot`` (a ViT-B vision-language model) draws only invalid or wild values on top of a
missing-weights base that must fail early. ``env --online`` is never drawn (it reaches the
network). ``HISTOFM_FUZZ_EXAMPLES=N`` sets N examples per command (default: a bounded CI run).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from histofm.cli import build_parser, main
from histofm.data import sample_path

EXAMPLES = int(os.environ.get("HISTOFM_FUZZ_EXAMPLES", "0"))
OUTCOMES: collections.Counter = collections.Counter()  # (command, kind, exit code) -> examples
FUZZ = settings(deadline=None, derandomize=EXAMPLES == 0, database=None, suppress_health_check=list(HealthCheck))
NO_GPU = not torch.cuda.is_available()

# Every sub-command (as typed) -> the test file that fuzzes it. The meta-test keeps this complete.
FUZZ_FILES = {
    "pretrain": "test_settings_fuzz.py",
    "semi": "test_settings_fuzz.py",
    "mil train": "test_mil_fuzz.py",
    "mil predict": "test_mil_fuzz.py",
    "mil heatmap": "test_mil_fuzz.py",
    "tile": "test_wsi_fuzz_cli.py",
    "extract": "test_wsi_fuzz_cli.py",
    "cluster": "test_wsi_fuzz_cli.py",
    "eval nuclei": "test_cli_fuzz_rest.py",
    "zeroshot": "test_cli_fuzz_rest.py",
    "segment": "test_cli_fuzz_rest.py",
    "shard": "test_cli_fuzz_rest.py",
    "slide-embed": "test_cli_fuzz_rest.py",
    "models": "test_cli_fuzz_rest.py",
    "env": "test_cli_fuzz_rest.py",
    "demo": "test_cli_fuzz_rest.py",
    "mil list": "test_cli_fuzz_rest.py",
}


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every runnable sub-command path ("mil train") -> its parser."""
    out = {}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and prefix:
        return {" ".join(prefix): parser}
    for action in subs:
        for name, child in action.choices.items():
            out.update(_leaves(child, (*prefix, name)))
    return out


def test_every_sub_command_has_a_fuzz_test() -> None:
    leaves = _leaves(build_parser())
    assert set(leaves) == set(FUZZ_FILES), set(leaves) ^ set(FUZZ_FILES)
    here = Path(__file__).parent
    for command, name in FUZZ_FILES.items():
        word = command.split()[-1]
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", (here / name).read_text()), (name, command)


# ------------------------------------------------------------------------------------------- world
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuzzrest")
    Image.open(sample_path("hgsc_nest")).convert("RGB").crop((300, 300, 428, 428)).save(root / "img.png")
    Image.open(sample_path("hgsc_nest")).convert("RGB").crop((300, 300, 748, 748)).save(root / "slide.png")
    (root / "notes.txt").write_text("not an image")
    (root / "latin.bin").write_bytes("caf\xe9\x00\xff\xfe".encode("latin-1") + bytes(range(256)))
    (root / "a_file").write_text("user data")
    (root / ".user.tmp").write_bytes(b"user")
    (root / "folder.png").mkdir()
    (root / "templates.txt").write_text("an H&E image of {}.\n")
    feats = root / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cells = rng.choice(100, size=12, replace=False)
        with h5py.File(feats / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(12, 16)).astype(np.float32)
            d = f.create_dataset("coords", data=(np.stack([cells // 10, cells % 10], 1) * 512).astype(np.int64))
            d.attrs["patch_size_level0"] = 512
            f.attrs["model_name"] = "prov_gigapath"
            f.attrs["mpp"] = 0.5
    nan = root / "nanfeats"
    nan.mkdir()
    with h5py.File(nan / "s0.h5", "w") as f:
        f["features"] = np.full((4, 16), np.nan, np.float32)
        f["coords"] = np.array([[0, 0], [512, 0], [0, 512], [512, 512]], np.int64)
        f.attrs["model_name"] = "prov_gigapath"
    (root / "outs").mkdir()
    return root


HOSTILE_NUMBERS = ["0", "-1", "-0.5", "nan", "inf", "-inf", "1e12", "1e999", "x", "", "1.5"]
HOSTILE_PATHS = ["{root}/missing", "{root}/a_file", "{root}/a_file/sub", "{root}/latin.bin", "{root}/folder.png",
                 "", " "]


def _wild(action: argparse.Action) -> st.SearchStrategy[list[str]]:
    """Argument lists for one parser action: its own choices / type mixed with hostile values."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true and friends: given or not
        return st.sampled_from([[flag], []])
    pool: list[str] = ["bogus", ""]
    if action.choices:
        pool += [str(c) for c in action.choices]
    if action.type in (int, float) or isinstance(action.default, int | float) and not isinstance(action.default, bool):
        pool += HOSTILE_NUMBERS
        if action.default is not None:
            pool.append(str(action.default))
    else:
        pool += HOSTILE_PATHS + HOSTILE_NUMBERS[:5]
        if isinstance(action.default, str):
            pool.append(action.default)
    return st.sampled_from(pool).map(lambda v: [flag, v])


# command -> (base argv, {flag: invalid values}); "{root}" is the world, "{out}" this example's --out.
DEVICE_BAD = ["gpu", "cuda:7", "tpu"] if NO_GPU else ["gpu", "cuda:99"]
SPEC: dict[str, tuple[list[str], dict[str, list[list[str]]]]] = {
    "eval nuclei": (
        ["eval", "nuclei", "--model", "vit_tiny_patch16_224", "--random-init", "--set", "depth=1", "--seeds", "1",
         "--linear-c", "1", "--shots", "2", "--episodes", "2", "--bootstrap", "0", "--stain-shift", "none",
         "--json", "{out}/n.json"],
        {
            "--model": [["nope_vit"], [""]],
            "--set": [["depth=0"], ["depth=x"], ["nokey=1"], ["depth"]],
            "--crop": [["0"], ["-4"], ["100000"]],
            "--device": [[d] for d in DEVICE_BAD],
            "--seeds": [["0"], ["-1"]],
            "--linear-c": [["0"], ["-1"], ["nan"], ["inf"]],
            "--shots": [["0"], ["-2"]],
            "--episodes": [["0"], ["-1"]],
            "--bootstrap": [["-1"]],
            "--json": [["{root}/a_file/sub.json"], ["{root}/folder.png"]],
            "--stain-shift": [["bogus"], ["hed-scale,purple"]],  # "" reads as no shift, like 'none'
            "--checkpoint": [["{root}/img.png"], ["{root}/missing.safetensors"], ["{root}/latin.bin"]],
        },
    ),
    "zeroshot": (
        ["zeroshot", "--model", "clip", "--classes", "a,b", "{root}/img.png", "--out", "{out}", "--no-progress"],
        {  # the base lacks --checkpoint for clip: every example must fail early (a valid run builds a ViT-B)
            "--model": [["nope"], [""]],
            "--classes": [[""], [","]],
            "--templates": [["{root}/missing.txt"], ["{root}/latin.bin"], ["{root}/notes.txt"]],
            "--checkpoint": [["{root}/missing"], ["{root}/a_file"], ["{root}/img.png"]],
            "--set": [["topk=0"], ["topk=x"], ["batch_size=-1"], ["nokey=1"], ["target_mpp=nan"]],
            "--mpp-override": [["0"], ["-1"], ["nan"]],
            "--out": [["{root}/a_file"], ["{root}/a_file/sub"]],
        },
    ),
    "segment": (
        ["segment", "--model", "vit_tiny_patch8_224", "--random-init", "--set", "backbone.depth=3", "--tile", "64",
         "{root}/img.png", "--out", "{out}", "--no-progress"],
        {
            "--model": [["nope_vit"]],
            "--tile": [["0"], ["-64"], ["100000"]],
            "--overlap": [["-1"], ["64"], ["1000"]],
            "--chunk": [["0"], ["-1"]],
            "--margin": [["-1"]],
            "--mask-format": [["jpeg"]],
            "--mpp-override": [["0"], ["-1"], ["nan"], ["inf"]],
            "--set": [["threshold=nan"], ["threshold=2"], ["min_size=-1"], ["nokey=1"], ["backbone.depth=0"]],
            "--device": [[d] for d in DEVICE_BAD],
            "--out": [["{root}/a_file"], ["{root}/a_file/sub"]],
            "<input>": [["{root}/missing.png"], ["{root}/notes.txt"], ["{root}/latin.bin"], ["{root}/folder.png"]],
        },
    ),
    "shard": (
        ["shard", "{root}/slide.png", "--mpp-override", "0.5", "--tile-size", "112", "--shard-size", "4", "--out",
         "{out}", "--no-progress"],
        {
            "--target-mpp": [["0"], ["-1"], ["nan"], ["inf"], ["x"], [""]],
            "--tile-size": [["0"], ["-3"], ["100000000"], ["1.5"]],
            "--overlap": [["-1"], ["112"], ["500"]],
            "--min-tissue": [["-0.1"], ["1.5"], ["nan"]],
            "--shard-size": [["0"], ["-1"]],
            "--quality": [["0"], ["101"], ["-5"]],
            "--mpp-override": [["0"], ["-1"], ["nan"], ["1e-9"]],
            "--backend": [["bogus"]],
            "--roi": [["{root}/missing.geojson"], ["{root}/latin.bin"]],
            "--out": [["{root}/a_file"], ["{root}/a_file/sub"]],
            "<input>": [["{root}/missing.svs"], ["{root}/notes.txt"], ["{root}/latin.bin"]],
        },
    ),
    "slide-embed": (
        ["slide-embed", "--slide-encoder", "prov_gigapath_slide", "{root}/feats", "--random-init", "--set",
         "in_chans=16", "--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=4", "--device", "cpu",
         "--out", "{out}", "--no-progress"],
        {
            "--slide-encoder": [["nope"], [""]],
            "--set": [["depth=0"], ["num_heads=5"], ["nokey=1"], ["depth=x"], ["tile_size=-1"]],
            "--device": [[d] for d in DEVICE_BAD],
            "--checkpoint": [["{root}/missing"], ["{root}/img.png"], ["{root}/latin.bin"]],
            "--out": [["{root}/a_file"], ["{root}/a_file/sub"]],
            "<input>": [["{root}/missing"], ["{root}/a_file"], ["{root}/nanfeats"]],
        },
    ),
    "models": (["models"], {"<input>": [["nope_model"], [""]]}),
    "env": (["env", "--json"], {"--timeout": [["0"], ["-1"], ["nan"], ["inf"]]}),
    "demo": (
        ["demo", "--quick", "--out", "{out}", "--no-progress"],
        {
            "--steps": [["0"], ["-1"], ["x"]],
            "--batch-size": [["0"], ["-4"], ["1.5"]],
            "--seed": [["-1"], ["x"], ["99999999999999999999"]],
            "--out": [["{root}/a_file"], ["{root}/a_file/sub"]],
        },
    ),
    "mil list": (["mil", "list"], {}),
}
# Commands whose valid run is not tried: their base must fail, or one invalid flag is always drawn.
ALWAYS_INVALID = {"demo", "zeroshot"}
NEVER_DRAWN = {"--online"}  # network
NO_WILD = {"demo"}  # a wild value may be valid, and a valid demo runs for minutes


def _fill(args: list[str], root: Path, out: Path) -> list[str]:
    return [a.format(root=root, out=out) for a in args]


def _replace(argv: list[str], flag: str, values: list[str]) -> list[str]:
    """argv with ``flag`` set to ``values`` (a positional when flag is ``<input>``; ``--set`` adds one more)."""
    if flag == "<input>":
        return [*argv, *values] if argv[0] == "models" else [*argv[:1], *values, *argv[1:]]
    if flag == "--set":
        return [*argv, flag, *values]
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return [*out, flag, *values]


@st.composite
def case(draw: st.DrawFn, command: str, root: Path) -> tuple[list[str], str, str]:
    """(argv, kind, flag): kind is 'valid', 'invalid' (the oracle says it must fail) or 'wild'."""
    base, invalid = SPEC[command]
    parser = _leaves(build_parser())[command]
    actions = [a for a in parser._actions if a.option_strings and a.option_strings[0] not in ("-h", *NEVER_DRAWN)]
    kinds = ["invalid"] if command in ALWAYS_INVALID else ["invalid", "invalid", "valid"]
    if command not in NO_WILD and actions:
        kinds.append("wild")
    if not invalid:
        kinds = [k for k in kinds if k != "invalid"]
    kind = draw(st.sampled_from(kinds), label="kind")
    argv, flag = list(base), ""
    if kind == "invalid":
        flag = draw(st.sampled_from(sorted(invalid)), label="flag")
        argv = _replace(argv, flag, draw(st.sampled_from(invalid[flag]), label="value"))
    elif kind == "wild":
        action = draw(st.sampled_from(actions), label="flag")
        flag = action.option_strings[0]
        values = draw(_wild(action), label="value")
        argv = _replace(argv, flag, values) if values else [a for a in argv if a != flag]
        if command in ALWAYS_INVALID:  # keep the run cheap: one invalid flag as well
            other = draw(st.sampled_from(sorted(set(invalid) - {flag} or set(invalid))), label="invalid")
            argv = _replace(argv, other, invalid[other][0])
    return argv, kind, flag


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if p == skip or skip in p.parents:
            continue
        s = p.lstat()
        out[str(p)] = (0, 0) if p.is_dir() else (s.st_size, s.st_mtime_ns)
    return out


def _refuse_constant(name: str) -> None:
    pytest.fail(f"a JSON output holds {name}")


def _finite(out: Path) -> None:
    for f in out.rglob("*"):
        if f.suffix == ".h5":
            with h5py.File(f, "r") as h:
                names: list[str] = []
                h.visit(names.append)
                for name in names:
                    if isinstance(h[name], h5py.Dataset):
                        a = np.asarray(h[name][()])
                        assert a.dtype.kind not in "fc" or np.isfinite(a).all(), f"{f.name}:{name} is not finite"
        elif f.suffix == ".json":
            json.loads(f.read_text(), parse_constant=_refuse_constant)
        elif f.suffix == ".csv":
            for word in f.read_text().replace("\n", ",").split(","):
                with contextlib.suppress(ValueError):
                    assert math.isfinite(float(word)), f"{f.name} holds {word}"


def _run(command: str, argv: list[str], kind: str, flag: str, root: Path, out: Path) -> None:
    before = _tree(root, out)
    err, stdout = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root / "outs")  # a relative path the command might write lands under the world, where it is seen
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: usage + one error line
                rc = int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        os.chdir(cwd)
    text = err.getvalue()
    OUTCOMES[command, kind, rc] += 1
    assert "Traceback" not in text, (argv, text)
    if kind == "valid":
        assert rc == 0, (argv, text)
    elif kind == "invalid":
        assert rc != 0, (argv, flag, stdout.getvalue()[-2000:])
    if rc != 0:
        lines = [ln for ln in text.splitlines() if "error:" in ln]
        assert len(lines) == 1 and lines[0].split("error:", 1)[1].strip(), (argv, text)
    else:
        if out.exists():
            _finite(out)
    assert _tree(root, out) == before, f"a file outside --out was created, changed or removed: {argv}"


def _fuzz(command: str, world: Path, data: st.DataObject, n: int) -> None:
    out = world / "outs" / f"o{sum(OUTCOMES.values())}"
    argv, kind, flag = data.draw(case(command, world), label="case")
    _run(command, _fill(argv, world, out), kind, flag, world, out)


def _n(ci: int) -> int:
    return EXAMPLES or ci


@settings(FUZZ, max_examples=_n(6))
@given(data=st.data())
def test_fuzz_eval_nuclei(world: Path, data: st.DataObject) -> None:
    _fuzz("eval nuclei", world, data, 0)


@settings(FUZZ, max_examples=_n(8))
@given(data=st.data())
def test_fuzz_zeroshot(world: Path, data: st.DataObject) -> None:
    _fuzz("zeroshot", world, data, 0)


@settings(FUZZ, max_examples=_n(8))
@given(data=st.data())
def test_fuzz_segment(world: Path, data: st.DataObject) -> None:
    _fuzz("segment", world, data, 0)


@settings(FUZZ, max_examples=_n(10))
@given(data=st.data())
def test_fuzz_shard(world: Path, data: st.DataObject) -> None:
    _fuzz("shard", world, data, 0)


@settings(FUZZ, max_examples=_n(6))
@given(data=st.data())
def test_fuzz_slide_embed(world: Path, data: st.DataObject) -> None:
    _fuzz("slide-embed", world, data, 0)


@settings(FUZZ, max_examples=_n(5))
@given(data=st.data())
def test_fuzz_models(world: Path, data: st.DataObject) -> None:
    _fuzz("models", world, data, 0)


@settings(FUZZ, max_examples=_n(3))
@given(data=st.data())
def test_fuzz_env(world: Path, data: st.DataObject) -> None:
    _fuzz("env", world, data, 0)


@settings(FUZZ, max_examples=_n(5))
@given(data=st.data())
def test_fuzz_demo(world: Path, data: st.DataObject) -> None:
    _fuzz("demo", world, data, 0)


@settings(FUZZ, max_examples=_n(2))
@given(data=st.data())
def test_fuzz_mil_list(world: Path, data: st.DataObject) -> None:
    _fuzz("mil list", world, data, 0)


def test_fuzz_summary() -> None:
    """Counts per (command, kind, exit code); run with -s to see them after a long run."""
    for key, count in sorted(OUTCOMES.items()):
        print("fuzz", *key, count)
    assert not [k for k in OUTCOMES if k[1] == "invalid" and k[2] == 0]
