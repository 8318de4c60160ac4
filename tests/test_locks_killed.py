"""A slide lock's own temporaries, left by a process killed inside ``try_lock``, are removed by the next one.

In the trident and clam layouts the lock sits beside the output in a subfolder of ``--out``
(``features_<model>/<slide>.lock``), where no folder-wide clean-up runs: the rerun's
``try_lock`` alone must leave nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from histofm.wsi.locks import lock_path, try_lock
from test_wsi_checks import _killed_in_try_lock


def _files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_rerun_removes_what_a_kill_inside_try_lock_left(tmp_path: Path) -> None:
    left = 0
    for n in range(1, 400):
        out = tmp_path / f"n{n}" / "features_vit" / "a.h5"
        if not _killed_in_try_lock(out, n):
            break  # try_lock finished before line n: every instant was tried
        left += len(_files(out.parent)) > lock_path(out).exists()  # more than a (complete) lock
        lock = try_lock(out)  # no remove_stale_temps of the folder first: the layouts' subfolders get none
        assert lock == lock_path(out), n
        lock.unlink()
        assert _files(out.parent) == [], f"left behind at line {n}: {_files(out.parent)}"
    else:
        pytest.fail("try_lock never finished within 400 traced lines")
    assert left > 0  # some kill really left a temporary for the rerun to remove
