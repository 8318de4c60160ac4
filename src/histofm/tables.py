"""The one CSV reader of every command (slide lists, labels, splits).

:func:`read_csv_table` reads a small CSV the way a user expects and refuses, in one
sentence naming the file, the row and the flag, what it cannot use:

* UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8"); another encoding or a
  binary file is refused with what it looks like;
* a header row is recognised when its cells name the required columns (case-insensitive,
  with aliases, e.g. ``slide`` for ``slide_path``); without one, columns are taken by position;
* blank lines are skipped; a blank value in a required column is refused with its row
  number (never read as a class or a path of its own).

Example::

    table = read_csv_table("labels.csv", required=["slide_id", "label"], flag="--labels")
    for row in table.rows:
        print(row["slide_id"], row["label"], "from row", row.row)
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from histofm.errors import HistofmError

_BINARY_KINDS = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"), (b"\x89HDF", "an HDF5 file"), (b"PK\x03\x04", "a zip archive (e.g. .xlsx)"),
    (b"%PDF", "a PDF document"), (b"\xd0\xcf\x11\xe0", "an old Excel/Office file"),
)


class Row(dict[str, str]):
    """One data row: column name -> stripped text, plus ``row`` (1-based line number in the file)."""

    row: int


@dataclass
class CsvTable:
    """A read CSV: ``columns`` in file order, ``rows`` (:class:`Row`), and whether a header was found."""

    path: Path
    columns: list[str]
    rows: list[Row] = field(default_factory=list)
    has_header: bool = True


def _decode(path: Path, data: bytes, flag: str) -> str:
    for magic, kind in _BINARY_KINDS:
        if data.startswith(magic):
            raise HistofmError(f"{path.name} is {kind}, not a CSV text file; {flag} needs a comma-separated text file.")
    if b"\x00" in data[:4096]:
        kind = "UTF-16 text" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "a binary file"
        raise HistofmError(f"{path.name} is {kind}, not a UTF-8 CSV; save it as CSV UTF-8 and pass it to {flag}.")
    try:
        return data.decode("utf-8-sig")  # strips a byte-order mark
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise HistofmError(
            f"{path.name} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as CSV UTF-8 "
            f"and pass it to {flag}."
        ) from None


def read_csv_table(
    path: str | os.PathLike[str],
    required: Iterable[str] = (),
    *,
    optional: Iterable[str] = (),
    aliases: Mapping[str, Iterable[str]] | None = None,
    flag: str = "the CSV",
    header: bool | None = None,
) -> CsvTable:
    """Read a CSV file into rows of named columns.

    Args:
        path: the CSV file.
        required: columns every row must have, non-blank.
        optional: columns that may be missing or blank (read as ``""``).
        aliases: other header names accepted for a column, e.g. ``{"slide_path": ["slide", "path"]}``.
        flag: the flag that gave the file, named in every message (e.g. ``"--labels"``).
        header: ``True`` the first row is a header, ``False`` there is none (columns by
            position: ``required`` then ``optional``), ``None`` detect it: a first row naming
            every required column (or an alias) is a header.

    Returns:
        The :class:`CsvTable`; with a header, ``columns`` holds the file's names with the
        aliases replaced by the canonical names.

    Raises:
        HistofmError: missing file, not UTF-8 text, no rows, a missing column, or a blank
            required value (the message names the row).
    """
    path = Path(path)
    required, optional = list(required), list(optional)
    if not path.is_file():
        raise HistofmError(f"{flag} {path} is not a file; check the path.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HistofmError(f"{flag} {path} cannot be read ({e.strerror or type(e).__name__}).") from None
    text = _decode(path, data, flag)
    try:
        lines = [(i, r) for i, r in enumerate(csv.reader(io.StringIO(text, newline="")), start=1)
                 if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise HistofmError(f"{path.name} is not a valid CSV ({e}); fix the file given to {flag}.") from None
    if not lines:
        raise HistofmError(f"{path.name} holds no rows; {flag} needs a CSV with {', '.join(required) or 'data'}.")
    canon = {name.lower(): name for name in required + optional}
    for name, others in (aliases or {}).items():
        canon.update({o.lower(): name for o in others})
    first = [canon.get(c.strip().lower(), c.strip()) for c in lines[0][1]]
    if header is None:
        header = bool(required) and all(name in first for name in required)
    if header:
        columns, body = first, lines[1:]
        missing = [name for name in required if name not in columns]
        if missing:
            raise HistofmError(
                f"{path.name} has no column {missing[0]!r} (its header is {', '.join(columns)}); "
                f"add it or fix the file given to {flag}."
            )
    else:
        columns, body = required + optional, lines
    table = CsvTable(path, columns, has_header=header)
    for number, cells in body:
        values = [c.strip() for c in cells]
        row = Row(zip(columns, values + [""] * (len(columns) - len(values)), strict=False))
        row.row = number
        for name in required:
            if not row.get(name):
                raise HistofmError(f"{path.name} row {number} has no value for {name!r}; fill it in or remove "
                                   f"the row of the file given to {flag}.")
        table.rows.append(row)
    return table
