"""Deterministic, resumable, rank-aware data order and augmentation.

The order of samples is a function of (seed, epoch): each epoch is a fresh
permutation drawn from a generator seeded with ``seed + epoch``; step ``t``
takes global batch ``t mod steps_per_epoch`` of epoch ``t // steps_per_epoch``.
Under data parallelism rank ``r`` of ``W`` takes the ``r``-th contiguous slice
of that global batch, so the concatenation over ranks is exactly the
single-process batch (what makes a 2-rank run equal a 1-rank run) and a resumed
run picks up at the exact batch it stopped at. This is the role of torch's
``DistributedSampler``, with two differences: slices are contiguous per step,
and iteration can start at any step.

Streams (``IterableDataset``) take part through the step-stream protocol instead:
``data.plan_steps(seed=, global_batch=, rank=, world_size=, num_workers=, start_step=,
stop_step=, views=)`` fixes this rank's batches for steps ``[start_step, stop_step)``
as a pure function of those arguments, and iterating then yields one
``(batch, keys)`` pair per step: the collated views and the names of their samples.
``views(item, epoch, index)`` is :meth:`SeededViews.apply` (the method's transform under the
sample's seed), so augmentations do not depend on workers, ranks or interruptions.
With workers, worker ``w`` yields steps ``start + w, start + w + W, ...`` (the
DataLoader's round-robin); :class:`histofm.data.shards.ShardStream` implements it.

Every augmentation of sample ``i`` in epoch ``e`` runs under its own seed
derived from (seed, e, i), inside a forked random state, so views do not depend
on worker processes, ranks, or whether the run was interrupted.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from histofm.errors import HistofmError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for augmenting sample ``index`` in ``epoch``."""
    return (((seed * 1_000_003) ^ (epoch + 7) * 998_244_353) * 1_000_000_007 + index) % (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with Python, NumPy and torch (CPU) RNGs seeded, restoring them afterwards."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    # Only the CPU generator: torch.manual_seed would also (lazily, slowly) seed every accelerator.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SeededViews(Dataset):
    """Apply a per-sample transform to ``base[i]`` under the seed of ``(seed, epoch, i)``.

    Indexed with ``(index, epoch)`` pairs (what :class:`StepBatchSampler` yields). An
    item that is a tuple or list ``(image, *rest)`` has only its first element transformed
    (captions, labels pass through).
    """

    def __init__(self, base: Any, transform: Callable[[Any], Any] | None, seed: int) -> None:  # noqa: ANN401
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> Any:  # noqa: ANN401
        index, epoch = key
        return self.apply(self.base[index], epoch, index)

    def apply(self, item: Any, epoch: int, index: int) -> Any:  # noqa: ANN401
        """The views of ``item``, sample ``index`` of ``epoch`` (what step streams call per sample)."""
        if self.transform is None:
            return item
        with seeded(sample_seed(self.seed, epoch, index)):
            if isinstance(item, (tuple, list)):
                return (self.transform(item[0]), *item[1:])
            return self.transform(item)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's ``(index, epoch)`` list for each step in ``[start_step, stop_step)``."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        seed: int,
        start_step: int,
        stop_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if global_batch % world_size:
            raise HistofmError(f"batch_size {global_batch} must be divisible by the number of processes ({world_size}).")
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch < 1:
            raise HistofmError(
                f"The dataset has {num_samples} samples, fewer than one batch of {global_batch}; "
                "lower batch_size or add data."
            )
        self.n, self.gb, self.lb = num_samples, global_batch, global_batch // world_size
        self.seed, self.start, self.stop, self.rank = seed, start_step, stop_step, rank
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """Sample order of ``epoch`` (identical on every rank)."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def batch_indices(self, step: int) -> list[tuple[int, int]]:
        """This rank's ``(index, epoch)`` pairs at ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        chunk = self.permutation(epoch)[i * self.gb : (i + 1) * self.gb]
        local = chunk[self.rank * self.lb : (self.rank + 1) * self.lb]
        return [(int(j), epoch) for j in local]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield self.batch_indices(step)

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def to_device(batch: Any, device: torch.device) -> Any:  # noqa: ANN401
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def first_image(sample: Any) -> torch.Tensor | None:  # noqa: ANN401
    """The first image tensor of a sample (a view list, an ``(image, caption)`` pair, a tensor)."""
    if isinstance(sample, torch.Tensor):
        return sample if sample.ndim == 3 else None
    if isinstance(sample, (tuple, list)):
        for s in sample:
            t = first_image(s)
            if t is not None:
                return t
    if isinstance(sample, dict):
        for s in sample.values():
            t = first_image(s)
            if t is not None:
                return t
    return None


def is_step_stream(data: Any) -> bool:  # noqa: ANN401
    """True for a dataset that follows the step-stream protocol (see the module docstring)."""
    return callable(getattr(data, "plan_steps", None))


class SampleTrace:
    """Records which samples each step used, when ``HISTOFM_SAMPLE_TRACE`` names a folder.

    Rank ``r`` appends ``step<TAB>key key ...`` lines to ``samples.rank{r}.txt`` there (flushed per
    step), so a test can compare an interrupted-and-resumed run with a clean one. Off otherwise.
    """

    def __init__(self, rank: int) -> None:
        folder = os.environ.get("HISTOFM_SAMPLE_TRACE")
        self._fh = None
        if folder:
            os.makedirs(folder, exist_ok=True)
            self._fh = open(os.path.join(folder, f"samples.rank{rank}.txt"), "a")  # noqa: SIM115 - closed in close()

    def record(self, step: int, keys: list[str]) -> None:
        if self._fh is not None:
            self._fh.write(f"{step}\t{' '.join(keys)}\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
