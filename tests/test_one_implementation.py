"""Issues 16 and 17: one implementation of each job.

One output-folder check, one device check and one ``--set`` parser, used by every command;
no pretraining method borrows code from another method's file (shared pieces live in
method-neutral modules such as ``methods/views.py``, ``methods/patches.py``, ``methods/pictures.py``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import histofm
from histofm.cli import main
from histofm.commands._vocab import parse_set, split_set
from histofm.errors import HistofmError
from histofm.methods.registry import METHOD_MODULES

SRC = Path(histofm.__file__).parent
# The one home of each job; a definition of the same name anywhere else is a copy.
HOMES = {"check_out_dir": "checks.py", "check_device": "checks.py", "check_range": "checks.py",
         "parse_value": "settings.py", "parse_set": "commands/_vocab.py", "split_set": "commands/_vocab.py",
         "read_csv_table": "tables.py", "parse_settings": "commands/zeroshot.py",
         "read_attributes": "wsi/provenance.py", "read_provenance": "wsi/provenance.py",
         "apply_preset": "methods/presets.py"}


@functools.cache
def _sources() -> tuple[tuple[str, tuple[ast.AST, ...]], ...]:
    """(path relative to the package, every AST node) of each module of ``src/histofm``, parsed once."""
    return tuple((path.relative_to(SRC).as_posix(), tuple(ast.walk(ast.parse(path.read_text(encoding="utf-8")))))
                 for path in sorted(SRC.rglob("*.py")))


def test_each_job_is_defined_once() -> None:
    found: dict[str, list[str]] = {}
    for rel, nodes in _sources():
        for node in nodes:
            if isinstance(node, ast.FunctionDef) and node.name in HOMES:
                found.setdefault(node.name, []).append(rel)
    assert found == {name: [home] for name, home in HOMES.items()}


# (importer, imported) method pairs still waiting for their shared pieces to move out (the
# DINO family is being recomposed from named loss modules, issue 17). This list only shrinks.
METHOD_BORROWING_DEBT: set[tuple[str, str]] = {
    ("histofm.methods.pluto", "histofm.methods.dinov2"),
}


def _imported_modules(path: Path) -> set[str]:
    """Every module named by an import in ``path``, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # ``from histofm.methods import mae``
    return names


def method_borrowings() -> set[tuple[str, str]]:
    """(method module, other method module it imports) over every registered method."""
    methods = set(METHOD_MODULES.values())
    found = set()
    for mod in sorted(methods):
        path = SRC.parent / (mod.replace(".", "/") + ".py")
        found |= {(mod, other) for other in _imported_modules(path) & methods if other != mod}
    return found


def test_no_method_imports_another_method() -> None:
    found = method_borrowings()
    new, gone = sorted(found - METHOD_BORROWING_DEBT), sorted(METHOD_BORROWING_DEBT - found)
    assert not new, f"a method imports another method's file; move the shared piece to a neutral module: {new}"
    assert not gone, f"no longer imported, delete from METHOD_BORROWING_DEBT: {gone}"


def test_the_borrowing_check_can_fail(tmp_path: Path) -> None:
    toy = tmp_path / "moco.py"
    toy.write_text("def f():\n    from histofm.methods.simclr import nt_xent\n    from histofm.methods import mae\n")
    assert {"histofm.methods.simclr", "histofm.methods.mae"} <= _imported_modules(toy)


def test_feature_file_attributes_have_one_reader(tmp_path: Path) -> None:
    """wsi and mil read a CLAM / TRIDENT style file through one function: coords attributes, lists, file wins."""
    for module in ("wsi/provenance.py", "mil/provenance.py"):
        tree = ast.parse((SRC / module).read_text(encoding="utf-8"))
        openers = {fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
                   for node in ast.walk(fn) if isinstance(node, ast.Attribute) and node.attr == "File"}
        assert openers <= {"read_attributes"}, (module, openers)
    import h5py
    import numpy as np

    from histofm.mil.provenance import compared_provenance
    from histofm.wsi.provenance import read_attributes, read_provenance

    path = tmp_path / "theirs.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 4), np.float32))
        coords = f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
        coords.attrs.update({"patch_size": 256, "overlap": 0, "mpp": 0.25, "name": b"S1"})
        f.attrs.update({"mpp": 0.5, "preprocess_mean": np.array([0.5, 0.25, 0.125]), "model_name": "uni"})
    attrs = read_attributes(path)
    assert attrs == {"patch_size": 256, "overlap": 0, "mpp": 0.5, "name": "S1", "model_name": "uni",
                     "preprocess_mean": [0.5, 0.25, 0.125]}
    wsi, mil = read_provenance(path), compared_provenance(path)
    assert wsi["preprocess_mean"] == mil["preprocess_mean"] == [0.5, 0.25, 0.125]
    assert wsi["overlap"] == mil["overlap"] == 0 and wsi["mpp"] == mil["mpp"] == 0.5
    assert wsi["weights_source"] == "unrecorded" and "weights_source" not in mil


def test_cli_names_exactly_the_command_modules_that_exist() -> None:
    """Leftover of issue 17: ``cli.COMMAND_MODULES`` named a module that did not exist (tests/test_cli_help.py
    checks that each named one imports; this checks the other way too: no command file is left unregistered)."""
    from histofm.cli import COMMAND_MODULES

    files = {p.stem for p in (SRC / "commands").glob("*.py") if not p.stem.startswith("_")}
    assert sorted(COMMAND_MODULES) == sorted(files)


def test_user_errors_are_histofm_errors() -> None:
    """Leftover of issue 17: a ValueError reaches the user as a traceback; raise HistofmError (one sentence)."""
    found = []
    for rel, nodes in _sources():
        for node in nodes:
            if not isinstance(node, ast.Raise):
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "ValueError":
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"raise HistofmError with the cause and the flag to change instead: {found}"


def test_parse_set_reads_values_like_the_settings() -> None:
    assert parse_set(["hidden_dim=128", "gated=false", "lr=1e-3", "dims=[1, 2]"]) == {
        "hidden_dim": 128, "gated": False, "lr": 0.001, "dims": [1, 2]}
    assert split_set(["a = 1", "b=x=y"]) == {"a": " 1", "b": "x=y"}
    with pytest.raises(HistofmError, match=r"--set 'gated' is not KEY=VALUE; write for example --set hidden_dim=128"):
        parse_set(["gated"], example="hidden_dim=128")


def _one_sentence(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_every_command_refuses_a_file_as_out_and_a_bad_device(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    feats = tmp_path / "feats"
    feats.mkdir()
    (feats / "S1.h5").write_bytes(b"")  # never opened: the checks come first
    for argv, needle in (
        (["zeroshot", "--model", "quiltnet_b32", "--random-init", "--classes", "a,b", str(tmp_path),
          "--out", str(afile)], "--out"),
        (["zeroshot", "--model", "quiltnet_b32", "--random-init", "--classes", "a,b", str(tmp_path),
          "--set", "device=gpu0", "--out", str(tmp_path / "z")], "--set device 'gpu0' is not a device"),
        (["slide-embed", "--slide-encoder", "prov_gigapath_slide", "--random-init", str(feats),
          "--device", "gpu0"], "--device 'gpu0' is not a device"),
        (["slide-embed", "--slide-encoder", "prov_gigapath_slide", "--random-init", str(feats),
          "--device", "cpu", "--out", str(afile)], "--out"),
    ):
        assert main(argv) == 2, argv
        err = _one_sentence(capsys)
        assert needle in err, (argv, err)
        if "--out" in needle:
            assert f"--out {afile} is an existing file" in err
    assert afile.read_text() == "mine" and not (tmp_path / "z").exists()
