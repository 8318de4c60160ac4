"""Every notebook runs (tiny settings); its committed .ipynb matches the jupytext script and carries its outputs.

The .ipynb files are executed with their full settings by ``python notebooks/execute.py`` so that a
reader sees the pictures and tables without running anything; CI runs the .py sources in the tiny
mode (``HISTOFM_TINY=1``). :func:`notebook_problems` is the check of a committed notebook; the
``test_problems_*`` tests show on small in-memory notebooks that it fails when it should.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))

# code that writes a picture file: the same cell must also show a picture (image/png) to a reader
SAVES_PICTURE = re.compile(r"\.png\b|savefig\(|imsave\(")


def _shows_picture(cell: nbformat.NotebookNode) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def notebook_problems(nb: nbformat.NotebookNode, source: nbformat.NotebookNode) -> list[str]:
    """What is wrong with the committed notebook ``nb`` given its paired ``source`` (the .py read by jupytext).

    Checks: the code cells equal the source's (else the outputs are stale); every code cell was run, in
    order, without an error, and has at least one output; every cell whose code writes a picture shows
    an image/png output; the notebook shows at least one picture.
    """
    code = [c for c in nb.cells if c.cell_type == "code"]
    want = [c.source.strip() for c in source.cells if c.cell_type == "code"]
    if [c.source.strip() for c in code] != want:
        return ["code cells differ from the paired .py: the outputs are stale"]
    problems = []
    counts = [c.get("execution_count") for c in code]
    if None in counts or 0 in counts:
        problems.append(f"code cells {[i for i, n in enumerate(counts) if not n]} were not executed")
    elif counts != sorted(counts):
        problems.append("cells were run out of order")
    if empty := [i for i, c in enumerate(code) if not c.get("outputs")]:
        problems.append(f"code cells {empty} have no output")
    if failed := [i for i, c in enumerate(code) if any(o.output_type == "error" for o in c.get("outputs", []))]:
        problems.append(f"code cells {failed} raised")
    if unseen := [i for i, c in enumerate(code) if SAVES_PICTURE.search(c.source) and not _shows_picture(c)]:
        problems.append(f"code cells {unseen} save a picture but show none inline")
    if not any(_shows_picture(c) for c in code):
        problems.append("no picture (image/png output) at all")
    return problems


def test_there_are_notebooks() -> None:
    assert len(SCRIPTS) >= 1


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_paired_ipynb_is_in_sync(script: Path) -> None:
    ipynb = script.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} missing: run `python notebooks/execute.py {script.stem}`"
    a = [(c.cell_type, c.source.strip()) for c in jupytext.read(script).cells]
    b = [(c.cell_type, c.source.strip()) for c in jupytext.read(ipynb).cells]
    assert a == b, f"{ipynb.name} is out of date: run `python notebooks/execute.py {script.stem}`"


# Notebooks whose full-settings run is not committed yet (the shared CPU machine could not finish them in
# time): strict xfail, so the test starts failing, as a reminder to remove the name, once the outputs land.
NOT_YET_EXECUTED: set[str] = set()  # notebooks whose full-settings outputs are not committed yet


@pytest.mark.parametrize("script", [
    pytest.param(s, marks=pytest.mark.xfail(strict=True, reason="full-settings outputs not committed yet"))
    if s.stem in NOT_YET_EXECUTED else s for s in SCRIPTS
], ids=lambda p: p.stem)
def test_committed_notebook_carries_its_full_run_outputs(script: Path) -> None:
    nb = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    problems = notebook_problems(nb, jupytext.read(script))
    assert not problems, f"{script.stem}: {'; '.join(problems)}: run `python notebooks/execute.py {script.stem}`"
    text = script.with_suffix(".ipynb").read_text()
    assert str(NOTEBOOKS.parent) not in text and "/tmp/" not in text, f"{script.stem}: outputs carry local paths"


# ------------------------------------------------------------- the check fails when it should
PNG = "iVBORw0KGgo="  # the first bytes of a PNG, base64: enough for a display_data record


def _pair() -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    """A tiny executed notebook (text, a saved and shown picture, a table) and its source."""
    cells = ["x = 1\nprint(x)", 'fig.savefig("curve.png")\ndisplay(Image("curve.png"))', "display(table)"]
    source = new_notebook(cells=[new_markdown_cell("# t"), *(new_code_cell(c) for c in cells)])
    outputs = [
        new_output("stream", name="stdout", text="1\n"),
        new_output("display_data", data={"image/png": PNG, "text/plain": "<Image>"}),
        new_output("display_data", data={"text/html": "<table></table>", "text/plain": "a b"}),
    ]
    nb = new_notebook(cells=[new_markdown_cell("# t")])
    for n, (c, out) in enumerate(zip(cells, outputs), start=1):
        nb.cells.append(new_code_cell(c, execution_count=n, outputs=[out]))
    return nb, source


def test_problems_none_for_a_complete_notebook() -> None:
    nb, source = _pair()
    assert notebook_problems(nb, source) == []


def test_problems_picture_saved_but_not_shown() -> None:
    nb, source = _pair()
    nb.cells[2].outputs = [new_output("stream", name="stdout", text="saved curve.png\n")]
    assert notebook_problems(nb, source) == [
        "code cells [1] save a picture but show none inline", "no picture (image/png output) at all"
    ]


def test_problems_cell_without_outputs() -> None:
    nb, source = _pair()
    nb.cells[3].outputs = []
    assert notebook_problems(nb, source) == ["code cells [2] have no output"]


def test_problems_stale_outputs() -> None:
    nb, source = _pair()
    source.cells[1].source = "x = 2\nprint(x)"  # the .py changed after the notebook was executed
    assert notebook_problems(nb, source) == ["code cells differ from the paired .py: the outputs are stale"]


def test_problems_not_executed_or_raised() -> None:
    nb, source = _pair()
    nb.cells[1].execution_count = None
    nb.cells[3].outputs.append(new_output("error", ename="ValueError", evalue="x", traceback=[]))
    assert notebook_problems(nb, source) == ["code cells [0] were not executed", "code cells [2] raised"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_runs(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HISTOFM_TINY": "1", "MPLBACKEND": "Agg", "HISTOFM_NOTEBOOK_OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
