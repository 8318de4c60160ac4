"""Execute the notebooks with their full settings and save each .ipynb with its outputs.

    python notebooks/execute.py                      # every notebook, in order (tens of CPU minutes)
    python notebooks/execute.py 02_ssl_pretraining_on_tiles --timeout 3600

The jupytext ``.py`` file is the source: it is read, run cell by cell in a fresh
Python kernel (``nbclient``, the kernel of this interpreter) with ``HISTOFM_TINY``
unset, and written to the paired ``.ipynb`` with the outputs (text, tables,
pictures) a reader sees without running anything. Pictures and files the
notebook writes go to a temporary folder (``HISTOFM_NOTEBOOK_OUT``), not into
the repository. ``tests/test_notebooks.py`` checks that the committed ``.ipynb``
files carry the same code as their ``.py`` sources and have outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _strip_local_paths(nb: object, replace: dict[str, str]) -> None:
    """Replace this machine's paths in every text output (committed files carry no local paths)."""

    def fix(text: str) -> str:
        for old, new in replace.items():
            text = text.replace(old, new)
        return text

    for cell in nb.cells:  # type: ignore[attr-defined]
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = fix(out["text"] if isinstance(out["text"], str) else "".join(out["text"]))
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/"):
                    out["data"][mime] = fix(value if isinstance(value, str) else "".join(value))


def _drop_empty_displays(nb: object) -> None:
    """Remove display outputs with nothing to show.

    Without ipywidgets, rich's live progress bars leave an empty ``<pre>`` in a
    kernel for every bar; a reader gains nothing from them.
    """
    for cell in nb.cells:  # type: ignore[attr-defined]
        if "outputs" in cell:
            cell["outputs"] = [out for out in cell["outputs"] if not _is_empty_display(out)]


def _is_empty_display(out: dict) -> bool:
    if out.get("output_type") != "display_data":
        return False
    data = out.get("data", {})
    if set(data) - {"text/plain", "text/html"}:
        return False
    plain = data.get("text/plain", "")
    plain = plain if isinstance(plain, str) else "".join(plain)
    return not plain.strip()


def execute(script: Path, timeout: int, threads: int = 1) -> float:
    """Run ``script`` (jupytext percent format) and write its paired .ipynb with outputs; returns seconds.

    ``threads`` sets ``OMP_NUM_THREADS`` in the kernel. One is the default: the recorded numbers
    were measured so, and on a busy machine more threads spin instead of working (notebook 05
    ran past an hour with two threads under load, and in 512 s with one).
    """
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(script)
    env = {k: v for k, v in os.environ.items() if k != "HISTOFM_TINY"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({
            "HISTOFM_NOTEBOOK_OUT": tmp,
            "OMP_NUM_THREADS": str(threads),
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            # rich and tqdm ask for ipywidgets in a kernel (and print a local path); not needed here
            "PYTHONWARNINGS": "ignore::UserWarning:rich.live,ignore:IProgress not found",
        })
        os.environ.pop("HISTOFM_TINY", None)
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(env)
        _strip_local_paths(nb, {tmp: "notebook_out", str(HERE.parent): ".", sys.prefix: "<venv>"})
        _drop_empty_displays(nb)
    seconds = time.perf_counter() - t0
    target = script.with_suffix(".ipynb")
    fd, tmp_path = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(jupytext.writes(nb, fmt="ipynb"))
    os.chmod(tmp_path, 0o644)
    os.replace(tmp_path, target)
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="notebook stems (default: all, in order)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the kernel")
    args = p.parse_args(argv)
    scripts = sorted(HERE.glob("[0-9][0-9]_*.py"))
    if args.names:
        scripts = [s for s in scripts if s.stem in args.names or s.stem[:2] in args.names]
    for script in scripts:
        seconds = execute(script, args.timeout, args.threads)
        print(f"{script.stem}: executed in {seconds:.0f} s", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
