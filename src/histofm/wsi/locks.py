"""Per-slide lock files, so several processes can share one ``--out`` without racing.

Before a process works on a slide it creates ``<slide>.lock`` beside the slide's output
file, holding one JSON line: ``{"pid": ..., "host": ..., "time": ...}``. The lock appears
with its record already in it (written to a temporary, then hard-linked into place: atomic
on local and NFS file systems), so a process killed at any instant never leaves an empty lock.
Another process that finds the lock

* skips the slide and reports it as done by another process, when the holder is alive
  (same host: its pid exists; another host: the lock is younger than :data:`STALE_LOCK_HOURS`);
* breaks the lock and takes the slide, when the holder is dead (a process killed mid-slide).

The holder removes its lock when the slide is finished, written or failed. TRIDENT
shares a job among processes the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from histofm.utils import pid_alive, remove_stale_temps, temp_name

STALE_LOCK_HOURS = 24.0
# A lock file still empty after this long belongs to a process that died between create and write.
_EMPTY_LOCK_SECONDS = 30.0


def lock_path(output: Path) -> Path:
    """The lock file of the slide whose output is ``output``: ``<folder>/<slide>.lock``."""
    return output.with_suffix(".lock")


def _holder(path: Path) -> dict[str, object] | None:
    """The lock's JSON record (``None`` when missing, empty or unreadable)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _is_stale(path: Path, record: dict[str, object] | None) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # gone meanwhile: try again to create it
    if record is None:
        return age > _EMPTY_LOCK_SECONDS
    pid, host = record.get("pid"), record.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        return pid != os.getpid() and not pid_alive(pid)
    return age > STALE_LOCK_HOURS * 3600


def _break(path: Path, record: dict[str, object] | None) -> None:
    """Remove a stale lock, unless another process replaced it with a fresh one meanwhile."""
    aside = path.with_name(temp_name(path.name))
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _holder(aside) != record:  # we moved someone's fresh lock: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
    with contextlib.suppress(FileNotFoundError):
        aside.unlink()


def _create(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text``, atomically; ``False`` when it exists already.

    The record is written to a temporary file first and hard-linked into place (``link`` fails
    when the target exists, atomically, like ``O_EXCL``), so a process killed at any instant
    leaves either no lock or a complete one, never an empty lock that a rerun would have to
    respect for :data:`_EMPTY_LOCK_SECONDS`. File systems without hard links fall back to
    ``O_CREAT | O_EXCL`` and a write.
    """
    tmp = path.with_name(temp_name(path.name))  # a dead process's leftover: removed by the next try_lock
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network or FAT file systems)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def try_lock(output: Path) -> Path | None:
    """Create the lock of ``output``'s slide; its path, or ``None`` when a live process holds it."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The record's temporary (or a broken lock set aside) of a process killed in here: nothing else
    # removes it where the lock sits beside the output in a subfolder of --out (trident, clam layouts).
    remove_stale_temps(path)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    for _ in range(10):
        if _create(path, json.dumps(record) + "\n"):
            return path
        held = _holder(path)
        if not _is_stale(path, held):
            return None
        _break(path, held)
    return None


@contextlib.contextmanager
def slide_lock(output: Path) -> Iterator[bool]:
    """Hold the lock of ``output``'s slide for the block; yields ``False`` when another live process holds it."""
    path = try_lock(output)
    try:
        yield path is not None
    finally:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
