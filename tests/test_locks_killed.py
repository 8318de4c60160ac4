"""A process killed at any instant inside ``try_lock``: the lock is absent or complete, and the rerun's
``try_lock`` alone takes it and leaves nothing behind.

A lock created empty (``O_CREAT | O_EXCL``, then killed before the record was written) used to be
respected by the rerun for 30 s, which then skipped the slide as "done by another process". In
the trident and clam layouts the lock sits beside the output in a subfolder of ``--out``
(``features_<model>/<slide>.lock``), where no folder-wide clean-up runs, so the lock's own
temporaries must be removed by ``try_lock`` itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from histofm.wsi.locks import lock_path, try_lock


def _killed_in_try_lock(out: Path, after_lines: int) -> bool:
    """Fork; the child runs ``try_lock(out)`` and dies (``os._exit``) at its ``after_lines``-th traced line.

    True when the child died inside ``try_lock``, False when it finished first.
    """
    pid = os.fork()
    if pid == 0:  # the child: count line events of histofm's code, die at the chosen one
        seen = 0

        def tracer(frame, event, arg):  # noqa: ANN001, ANN202
            nonlocal seen
            if "histofm" in frame.f_code.co_filename and event == "line":
                seen += 1
                if seen == after_lines:
                    os._exit(9)
            return tracer

        sys.settrace(tracer)
        try_lock(out)
        sys.settrace(None)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 9


def _files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_lock_killed_at_any_instant_is_absent_or_complete_and_the_rerun_cleans_up(tmp_path: Path) -> None:
    left = 0
    for n in range(1, 400):
        out = tmp_path / f"n{n}" / "features_vit" / "a.h5"
        if not _killed_in_try_lock(out, n):
            break  # try_lock finished before line n: every instant was tried
        if lock_path(out).exists():
            record = json.loads(lock_path(out).read_text())
            assert record["host"] == socket.gethostname() and isinstance(record["pid"], int), n
        left += len(_files(out.parent)) > lock_path(out).exists()  # more than a (complete) lock
        lock = try_lock(out)  # no remove_stale_temps of the folder first: the layouts' subfolders get none
        assert lock == lock_path(out), f"a rerun could not take the lock of a process killed at line {n}"
        lock.unlink()
        assert _files(out.parent) == [], f"left behind at line {n}: {_files(out.parent)}"
    else:
        pytest.fail("try_lock never finished within 400 traced lines")
    assert n > 5  # the child really was killed at several instants inside try_lock
    assert left > 0  # some kill really left a temporary for the rerun to remove
