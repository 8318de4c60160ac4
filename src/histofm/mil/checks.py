"""Checks of ``histofm mil`` flags that run before any work, each failing in one sentence naming the flag.

Private versions of the shared checks (output folder, device, numbers) with the same
behaviour, kept here so ``mil`` does not wait on them; they leave nothing behind (the
write probe is removed at once), so a command refused later leaves no empty ``--out``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from histofm.errors import HistofmError

SEED_MAX = 2**32 - 1  # numpy's seed range; torch takes more, but the folds are drawn by numpy


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a folder that exists or can be created, and can be written; nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HistofmError(f"{flag} {path} is an existing file, but it must be a folder; choose another {flag}.")
    parent = path
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HistofmError(f"{flag} {path} lies under the file {parent}, which cannot hold folders; choose another {flag}.")
    try:  # a real probe (root passes every os.access check, not a read-only or special file system)
        if parent == path:
            fd, probe = tempfile.mkstemp(prefix=".histofm-write-check-", dir=path)
            os.close(fd)
            os.unlink(probe)
        else:
            first = path
            while first.parent != parent:
                first = first.parent
            first.mkdir()
            first.rmdir()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise HistofmError(f"{flag} {path} cannot be written ({reason}); choose a folder you can write to.") from None
    return path


def check_device(spec: str | None, flag: str = "--device") -> str | None:
    """``spec`` if torch knows it and this machine has it (``None`` passes: the best available)."""
    if spec is None:
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise HistofmError(f"{flag} {spec!r} is not a device; use cpu, cuda, cuda:1 or mps.") from None
    if device.type == "cpu":
        return spec
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise HistofmError(f"{flag} {spec} asks for a CUDA GPU, but this machine has none; use {flag} cpu.")
        if device.index is not None and device.index >= count:
            raise HistofmError(f"{flag} {spec} asks for GPU {device.index}, but this machine has {count}; "
                               f"use {flag} cuda:0 .. cuda:{count - 1}.")
        return spec
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise HistofmError(f"{flag} mps asks for an Apple GPU, but this machine has none; use {flag} cpu.")
        return spec
    raise HistofmError(f"{flag} {spec!r} is not a device histofm runs on; use cpu, cuda, cuda:1 or mps.")


def check_range(value: float | None, flag: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Refuse ``value`` outside ``[low, high]`` (``(low, high]`` with ``low_open``), NaN and infinities."""
    if value is None:
        return
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if ok:
        return
    if low is not None and high is not None:
        bound = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
    elif low is not None:
        bound = f"{'above' if low_open else 'at least'} {low:g}"
    else:
        bound = f"at most {high:g}"
    raise HistofmError(f"{flag} must be a finite number {bound}, not {value:g}; change {flag}.")
