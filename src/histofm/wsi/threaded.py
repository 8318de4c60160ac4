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

    A yielded batch is valid until the next one is requested: its memory is then reused for a
    batch being read (fresh 10 MB buffers would cost their page faults every time). Copy it to
    keep it (extraction normalises it into its own buffer or moves it to the device at once).

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
        self._free: deque[torch.Tensor] = deque()  # buffers of batches already consumed

    def _read(self, thread: int, rows: Sequence[int], buffer: torch.Tensor | None) -> torch.Tensor:
        dataset = self._datasets[thread]
        size = dataset.tile_size
        shape = (len(rows), size, size, 3)
        out = buffer if buffer is not None and tuple(buffer.shape) == shape else torch.empty(shape, dtype=torch.uint8)
        slots = out.numpy()  # (B, S, S, 3)
        for j, index in enumerate(rows):
            dataset.read_into(int(index), slots[j])  # decoded straight into the batch
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        # One single-thread executor per band keeps each band's batches in order on one reader.
        pools = [cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"histofm-read{t}") for t in range(self.threads)]
        pending: deque[cf.Future[torch.Tensor]] = deque()
        submitted = 0
        last: torch.Tensor | None = None
        try:
            for _ in range(len(self.batches)):
                if last is not None:  # the consumer asked for the next batch: the last one's memory is free
                    self._free.append(last)
                while submitted < len(self.batches) and len(pending) < self.threads * self._ahead:
                    t = submitted % self.threads
                    buffer = self._free.popleft() if self._free else None
                    pending.append(pools[t].submit(self._read, t, self.batches[submitted], buffer))
                    submitted += 1
                last = pending.popleft().result()
                yield last
        finally:
            for future in pending:
                future.cancel()
            for pool in pools:
                pool.shutdown(wait=True)
            for dataset in self._datasets:
                dataset.close()

