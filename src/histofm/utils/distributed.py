"""Data-parallel helpers: process-group set-up under ``torchrun`` and a gradient-preserving all-gather.

Contrastive losses (SimCLR, MoCo v3, CLIP) compare each sample with the negatives
of the WHOLE global batch, so features are gathered from every rank. A plain
``all_gather`` cuts the graph; :func:`gather_with_grad` keeps it: its backward
sums the incoming gradients over ranks (``all_reduce``) and returns each rank the
slice that belongs to its own samples. With DistributedDataParallel averaging the
parameter gradients over ``W`` ranks, and each rank's loss being the mean over
its local anchors, the result equals the gradient of the single-process loss on
the global batch::

    dL/dtheta = 1/W sum_r dL_r/dtheta,   dL_r/dz_s flows back to rank s through the all-reduce.

Outside a process group every function here is the identity / a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the process that logs and writes files)."""
    return rank() == 0


def init_from_env(device_type: str = "cpu") -> bool:
    """Join the process group described by ``torchrun``'s environment variables, if any.

    Returns True when a multi-process group is (now) active. Uses NCCL for CUDA and gloo otherwise.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W * B, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on our samples
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``(B, ...)`` from all ranks in rank order -> ``(W * B, ...)``, keeping gradients.

    Every rank must pass the same batch size. Identity outside a process group.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather without a graph (for keys of a momentum encoder, queues)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a detached copy; identity outside a process group)."""
    if not is_distributed():
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def all_gather_object(obj: Any) -> list[Any]:  # noqa: ANN401
    """Collect one picklable object per rank (a one-element list outside a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()
