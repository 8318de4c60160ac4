"""Tile selection of the next slide in a background thread while the current slide is read.

Tissue detection and tiling are a fixed cost per slide (a thumbnail read, then morphology
on it: about half a second of one core) that used to sit between two slides with the
readers idle. :class:`SelectionAhead` starts the next slide's selection in one background
thread as soon as the current slide's DataLoader workers exist (never before a ``fork``:
a thread inside a slide library at fork time could leave a lock taken in the child), and
the extraction loop takes the result when it reaches that slide. The result is the same
:class:`~histofm.wsi.selection.TileSelection` the loop would compute itself, errors included
(re-raised where the loop would have raised them).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from pathlib import Path

from histofm.wsi.selection import TileSelection


class SelectionAhead:
    """At most one selection running ahead, keyed by slide path.

    Args:
        select: computes the selection of one slide (opens it itself: the thread has its own handle).
    """

    def __init__(self, select: Callable[[Path], TileSelection]) -> None:
        self._select = select
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: dict[Path, cf.Future[TileSelection]] = {}

    def start(self, path: Path) -> None:
        """Begin selecting ``path`` in the background (no-op if already started)."""
        if path in self._pending:
            return
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="histofm-select")
        self._pending[path] = self._pool.submit(self._select, path)

    def wait(self, path: Path) -> cf.Future[TileSelection] | None:
        """The finished future of ``path`` (waited for), or ``None`` when it was not started."""
        future = self._pending.pop(path, None)
        if future is not None:
            cf.wait([future])
        return future

    def close(self) -> None:
        """Cancel what has not started and wait for the thread to finish."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
