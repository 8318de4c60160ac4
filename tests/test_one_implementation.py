"""Issues 16 and 17: one output-folder check, one device check and one ``--set`` parser, used by every command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import histofm
from histofm.cli import main
from histofm.commands._vocab import parse_set, split_set
from histofm.errors import HistofmError

SRC = Path(histofm.__file__).parent
# The one home of each job; a definition of the same name anywhere else is a copy.
HOMES = {"check_out_dir": "checks.py", "check_device": "checks.py", "check_range": "checks.py",
         "parse_value": "settings.py", "parse_set": "commands/_vocab.py", "split_set": "commands/_vocab.py",
         "read_csv_table": "tables.py", "parse_settings": "commands/zeroshot.py"}


def test_each_job_is_defined_once() -> None:
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name in HOMES:
                found.setdefault(node.name, []).append(path.relative_to(SRC).as_posix())
    assert found == {name: [home] for name, home in HOMES.items()}


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
