"""Every notebook runs (tiny settings); its committed .ipynb matches the jupytext script and carries its outputs.

The .ipynb files are executed with their full settings by ``python notebooks/execute.py`` so that a
reader sees the pictures and tables without running anything; CI runs the .py sources in the tiny
mode (``HISTOFM_TINY=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks() -> None:
    assert len(SCRIPTS) >= 1


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_paired_ipynb_is_in_sync(script: Path) -> None:
    ipynb = script.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} missing: run `jupytext --to ipynb {script.name}`"
    a = [(c.cell_type, c.source.strip()) for c in jupytext.read(script).cells]
    b = [(c.cell_type, c.source.strip()) for c in jupytext.read(ipynb).cells]
    assert a == b, f"{ipynb.name} is out of date: run `jupytext --sync {script.name}`"


# Notebooks whose full-settings run is not committed yet (the shared CPU machine could not finish them in
# time): strict xfail, so the test starts failing, as a reminder to remove the name, once the outputs land.
NOT_YET_EXECUTED: set[str] = set()  # notebooks whose full-settings outputs are not committed yet


@pytest.mark.parametrize("script", [
    pytest.param(s, marks=pytest.mark.xfail(strict=True, reason="full-settings outputs not committed yet"))
    if s.stem in NOT_YET_EXECUTED else s for s in SCRIPTS
], ids=lambda p: p.stem)
def test_committed_notebook_carries_its_full_run_outputs(script: Path) -> None:
    import nbformat

    nb = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    missing = [i for i, c in enumerate(code) if not c.get("execution_count")]
    assert not missing, f"{script.stem}: code cells {missing} were not executed: run `python notebooks/execute.py {script.stem}`"
    counts = [c.execution_count for c in code]
    assert counts == sorted(counts), f"{script.stem}: cells were run out of order"
    outputs = [o for c in code for o in c.outputs]
    assert outputs, f"{script.stem}: no outputs"
    assert not [o for o in outputs if o.output_type == "error"], f"{script.stem}: a cell raised"
    text = script.with_suffix(".ipynb").read_text()
    assert str(NOTEBOOKS.parent) not in text and "/tmp/" not in text, f"{script.stem}: outputs carry local paths"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_runs(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HISTOFM_TINY": "1", "MPLBACKEND": "Agg", "HISTOFM_NOTEBOOK_OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
