"""Small helpers shared across the package: atomic writes, seeding, progress."""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# Temporary files of atomic_path: ".<target name>.histofm-<pid>-<random>.tmp" beside the target.
# Only files of this exact pattern are ever removed, and only when stale (see remove_stale_temps).
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.histofm-(?P<pid>\d+)-(?P<rand>[0-9a-z]{8})\.tmp$")
STALE_TEMP_HOURS = 24.0


def temp_name(target_name: str) -> str:
    """A temporary name for ``target_name`` unique to this process: ``.<name>.histofm-<pid>-<rand>.tmp``."""
    rand = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    return f".{target_name}.histofm-{os.getpid()}-{rand}.tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary is named ``.<name>.histofm-<pid>-<rand>.tmp`` (:data:`TEMP_PATTERN`), so
    processes writing into one folder never share one, and clean-up can tell histofm's
    files from the user's. A crash (or an exception) inside the block leaves ``path``
    untouched and removes the temporary file, so readers never see a half-written output.
    Outputs get the usual permissions (``0666`` less the umask), like any new file.
    """
    target = Path(path)
    make_dirs(target.parent)
    remove_stale_temps(target)
    while True:
        tmp_path = target.parent / temp_name(target.name)
        try:
            fd = os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # mode & ~umask
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # writers such as torch.save may have replaced the file
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` with the usual directory permissions (``0777`` less the umask)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this machine (or cannot be signalled by us)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OverflowError:
        return False
    return True


def is_stale_temp(path: Path, max_age_hours: float = STALE_TEMP_HOURS) -> bool:
    """True for a histofm temporary (:data:`TEMP_PATTERN`) whose process is dead or that is older than ``max_age_hours``."""
    m = TEMP_PATTERN.match(path.name)
    if m is None:
        return False
    if int(m["pid"]) == os.getpid():
        return False  # ours: still being written (or removed by its own block)
    if not pid_alive(int(m["pid"])):
        return True
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > max_age_hours * 3600


def remove_stale_temps(target: str | os.PathLike[str], max_age_hours: float = STALE_TEMP_HOURS) -> int:
    """Delete histofm's own stale temporary files beside ``target`` (or, for a directory, in it).

    Only names of the pattern ``.<name>.histofm-<pid>-<rand>.tmp`` (:data:`TEMP_PATTERN`) are
    considered, and only when process ``pid`` is no longer alive or the file is older than
    ``max_age_hours`` (a pid reused after a reboot); every other file, the user's ``.tmp``
    files included, is left alone. Returns how many were removed.
    """
    target = Path(target)
    folder = target if target.is_dir() else target.parent
    if not folder.is_dir():
        return 0
    pattern = "*.histofm-*.tmp" if target.is_dir() else f".{glob.escape(target.name)}.histofm-*.tmp"
    removed = 0
    for stale in folder.glob(pattern):
        m = TEMP_PATTERN.match(stale.name)
        if m is None or (not target.is_dir() and m["name"] != target.name) or not is_stale_temp(stale, max_age_hours):
            continue
        try:
            stale.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when available, then Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
