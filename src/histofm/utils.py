"""Small helpers shared across the package: atomic writes, seeding, progress."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A crash (or an exception) inside the block leaves ``path`` untouched and removes
    the temporary file, so readers never see a half-written output.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(target: str | os.PathLike[str]) -> int:
    """Delete temporary files that :func:`atomic_path` left beside ``target`` when a process was killed.

    ``target`` may be a file (its own temporaries) or a directory (all temporaries in it).
    Returns how many were removed.
    """
    target = Path(target)
    pattern = ".*.tmp" if target.is_dir() else f".{target.name}.*.tmp"
    folder = target if target.is_dir() else target.parent
    removed = 0
    for stale in folder.glob(pattern):
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
