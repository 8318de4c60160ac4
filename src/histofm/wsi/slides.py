"""Slide lists from the command line: files, folders, or a CSV with a per-slide mpp.

``histofm tile`` and ``histofm extract`` take any mix of

* slide files (``a.svs b.ndpi``);
* folders: every file in it with a slide or image extension (not recursive), sorted;
* CSV files: one slide per row, ``slide_path[,mpp]``; the header row is optional (a first
  row naming ``slide_path`` (or ``slide``, ``path``, ``filename``, ``wsi``) is a header). UTF-8
  with or without a byte-order mark; a blank slide cell is refused with its row number.
  Relative paths are relative to the CSV's folder. ``mpp`` (level-0 microns per pixel)
  overrides the slide's metadata and ``--mpp-override`` for that slide; an empty cell keeps them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from histofm.errors import HistofmError
from histofm.tables import read_csv_table

SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".dcm",
    ".png", ".jpg", ".jpeg",
})
_HEADER_NAMES = ("slide", "path", "filename", "wsi")  # accepted for slide_path


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
    """Rows ``slide_path[,mpp]`` of a CSV (see the module docstring), read by :func:`histofm.tables.read_csv_table`."""
    path = Path(path)
    table = read_csv_table(path, ["slide_path"], optional=["mpp"], aliases={"slide_path": _HEADER_NAMES},
                           flag="the slide list")
    out = []
    for row in table.rows:
        slide = Path(row["slide_path"])
        if not slide.is_absolute():
            slide = path.parent / slide
        out.append(SlideInput(slide, _mpp(row.get("mpp", ""), f"{path.name} row {row.row}")))
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
