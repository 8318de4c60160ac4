"""Slide lists from the command line: files, folders, or a CSV with a per-slide mpp.

``histofm tile`` and ``histofm extract`` take any mix of

* slide files (``a.svs b.ndpi``);
* folders: every file in it with a slide or image extension (not recursive), sorted;
* CSV files: one slide per row, ``slide_path[,mpp]``; the header row is optional (a first
  row whose first cell is ``slide_path``, ``slide``, ``path`` or ``filename`` is a header).
  Relative paths are relative to the CSV's folder. ``mpp`` (level-0 microns per pixel)
  overrides the slide's metadata and ``--mpp-override`` for that slide; an empty cell keeps them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from histofm.errors import HistofmError

SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".dcm",
    ".png", ".jpg", ".jpeg",
})
_HEADER_NAMES = {"slide_path", "slide", "path", "filename", "wsi"}


@dataclass(frozen=True)
class SlideInput:
    """A slide and its level-0 mpp override (``None``: metadata or the global override)."""

    path: Path
    mpp: float | None = None


def _mpp(cell: str, where: str) -> float | None:
    cell = cell.strip()
    if not cell:
        return None
    try:
        value = float(cell)
    except ValueError:
        raise HistofmError(f"{where}: mpp {cell!r} is not a number; write microns per pixel such as 0.25.") from None
    if not 0.02 <= value <= 50:
        raise HistofmError(f"{where}: mpp {value:g} is outside 0.02 - 50 um/px; write microns per pixel such as 0.25.")
    return value


def read_slide_csv(path: str | os.PathLike[str]) -> list[SlideInput]:
    """Rows ``slide_path[,mpp]`` of a CSV (see the module docstring)."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in _HEADER_NAMES:
        rows = rows[1:]
    out = []
    for i, row in enumerate(rows, start=1):
        where = f"{path.name} row {i}"
        slide = Path(row[0].strip())
        if not slide.is_absolute():
            slide = path.parent / slide
        out.append(SlideInput(slide, _mpp(row[1], where) if len(row) > 1 else None))
    if not out:
        raise HistofmError(f"{path.name} lists no slides; write one slide_path[,mpp] per row.")
    return out


def resolve_slides(items: Sequence[str | os.PathLike[str]]) -> list[SlideInput]:
    """Expand files, folders and CSV lists into slides (order kept, duplicates removed).

    Missing files are kept (extraction reports them per slide); a missing folder or an
    empty one is an error.
    """
    out: list[SlideInput] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise HistofmError(
                    f"The folder {path} holds no slides ({', '.join(sorted(SLIDE_SUFFIXES))}); give slide files or a CSV."
                )
            out.extend(SlideInput(p) for p in found)
        elif path.suffix.lower() == ".csv" and path.is_file():
            out.extend(read_slide_csv(path))
        else:
            out.append(SlideInput(path))
    seen: set[Path] = set()
    unique = []
    for s in out:
        if s.path not in seen:
            seen.add(s.path)
            unique.append(s)
    return unique
