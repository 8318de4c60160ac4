"""Batches of uint8 tiles read by threads of this process: no fork, no shared-memory hand-over.

Where a slide's level is decoded from its stored tiles (:mod:`histofm.wsi.stored`), reading
a tile is almost all JPEG decoding in imagecodecs, which releases the GIL, so threads read
in parallel as well as processes do. Threads save what DataLoader worker processes cost on
top of the decoding: starting the processes (a fork, then each one opening the slide), and
for every batch a fresh shared-memory segment, its page faults on both sides and a pickled
hand-over (together about a fifth of the decoding time of a 224 px tile).

Each thread owns one :class:`~histofm.wsi.dataset.SlideTileDataset` (so one reader and one
cache of decoded stored tiles) and reads the batches of one contiguous band of rows
(:func:`~histofm.wsi.dataset.raster_batches`: batch ``k`` goes to thread ``k % threads``),
so each stored tile is decoded about once. Batches come back in order, a few ahead.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from histofm.wsi.dataset import SlideTileDataset


class ThreadedTiles:
    """Iterate ``(B, S, S, 3)`` uint8 batches of ``batches`` (lists of tile indices), in order.

    Args:
        make_dataset: builds a fresh dataset (one per thread; each opens its own reader).
        batches: tile indices per batch, in the order to yield them.
        threads: reading threads (at least 1).
        ahead: batches read ahead per thread.
    """

    def __init__(
        self, make_dataset: Callable[[], SlideTileDataset], batches: Sequence[Sequence[int]], threads: int,
        ahead: int = 2,
    ) -> None:
        self.batches = batches
        self.threads = max(1, int(threads))
        self._datasets = [make_dataset() for _ in range(self.threads)]
        self._ahead = max(1, int(ahead))

    def _read(self, thread: int, rows: Sequence[int]) -> torch.Tensor:
        dataset = self._datasets[thread]
        size = dataset.tile_size
        out = torch.empty((len(rows), size, size, 3), dtype=torch.uint8)  # (B, S, S, 3)
        for j, index in enumerate(rows):
            out[j] = dataset._read_tensor(int(index)).permute(1, 2, 0)  # undo the (3, S, S) view
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        # One single-thread executor per band keeps each band's batches in order on one reader.
        pools = [cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"histofm-read{t}") for t in range(self.threads)]
        pending: deque[cf.Future[torch.Tensor]] = deque()
        submitted = 0
        try:
            for _ in range(len(self.batches)):
                while submitted < len(self.batches) and len(pending) < self.threads * self._ahead:
                    t = submitted % self.threads
                    pending.append(pools[t].submit(self._read, t, self.batches[submitted]))
                    submitted += 1
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            for pool in pools:
                pool.shutdown(wait=True)
            for dataset in self._datasets:
                dataset.close()

