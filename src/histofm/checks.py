"""Checks of user values that run before any work starts, each failing in one sentence naming the flag.

* :func:`check_out_dir`: an output folder that can be created and written (not a file, not
  under a file, not read-only);
* :func:`check_device`: a device torch knows and this machine has;
* :func:`check_alloc`: an allocation computed from user values that fits in the memory available;
* :func:`check_range`: a number inside its allowed range.

Floor 1 (beside :mod:`histofm.utils`): commands of every kind can use these.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from histofm.errors import HistofmError
from histofm.settings import shown


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Raise unless ``path`` is a folder that can be written, or can be created; creates nothing.

    An existing folder gets a probe file written and removed inside it; a missing one a probe
    folder made and removed in its nearest existing ancestor (so a refused run leaves no ``--out``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HistofmError(f"{flag} {shown(path)} is an existing file, but it must be a folder; choose another {flag}.")
    parent = path
    while not parent.exists():  # the nearest existing ancestor decides
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise HistofmError(f"{flag} {shown(path)} lies under the file {shown(parent)}, which cannot hold folders; "
                           f"choose another {flag}.")
    try:
        if path.is_dir():
            fd, probe = tempfile.mkstemp(prefix=".histofm-write-check-", dir=path)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".histofm-write-check-", dir=parent))
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise HistofmError(f"{flag} {shown(path)} cannot be written ({reason}); choose a folder you can write to.") from None
    return path


def check_device(spec: str | None, flag: str = "--device", *, allow_auto: bool = False) -> str | None:
    """``spec`` if torch knows it and this machine has it (``None`` passes: the best available).

    Args:
        spec: the device the user named (``cpu``, ``cuda:1``, ``mps``), or ``None``.
        flag: the flag (or ``--set``/``--config`` origin) to name in the message.
        allow_auto: ``auto`` also passes (commands whose default is ``auto``).
    """
    if spec is None or (allow_auto and spec == "auto"):
        return spec
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


def available_memory() -> int:
    """Bytes of memory available to this process (``MemAvailable``, else total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_alloc(nbytes: float, what: str, flag: str, *, fraction: float = 0.5) -> None:
    """Refuse an allocation of ``nbytes`` (computed from a user value) above ``fraction`` of the available memory.

    Args:
        nbytes: bytes the value would make histofm allocate (or write).
        what: what would be allocated, e.g. ``"the tile grid of slide.svs"``.
        flag: the flag(s) to change, e.g. ``"--target-mpp or --mpp-override"``.
        fraction: share of the available memory one allocation may take.
    """
    if not math.isfinite(nbytes) or nbytes > fraction * available_memory():
        size = "an unbounded amount" if not math.isfinite(nbytes) else _human(nbytes)
        raise HistofmError(f"{what} would need {size} of memory, more than this machine has available; change {flag}.")


def check_range(
    value: float | None,
    flag: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> None:
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
    kind = "a whole number" if integer else "a number"
    if low is not None and high is not None:
        bound = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
    elif low is not None:
        bound = f"{'above' if low_open else 'at least'} {low:g}"
    else:
        bound = f"at most {high:g}"
    raise HistofmError(f"{flag} must be {kind} {bound}, not {value:g}.")


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"
