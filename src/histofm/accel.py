"""Speed-ups that leave the numbers alone: regional ``torch.compile``, FSDP2 sharding, channels-last.

* :func:`compile_blocks` compiles each repeated Transformer block in place
  ("regional compilation"): a ViT-L has 24 identical blocks, so the compiler
  traces one block once and reuses the code 24 times. Compile time stays that of
  one block, and the rest of the model (patch embedding, heads, losses with
  data-dependent shapes) stays eager. Models without such blocks are compiled whole.
* :func:`shard_fsdp` applies FSDP2 (``torch.distributed.fsdp.fully_shard``): each
  block becomes its own communication group (its parameters are all-gathered just
  before it runs and freed after), and everything else belongs to the root group.
  Memory per GPU for parameters, gradients and AdamW states falls roughly as
  ``1 / world_size``, which is what lets ViT-L and larger train where DDP's full
  replicas do not fit.
* :func:`grad_checkpointing` trades compute for activation memory in every backbone.
* :func:`channels_last` stores convolution weights and inputs as NHWC, which tensor
  cores prefer; in a ViT it only touches the patch-embedding convolution.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from histofm.errors import HistofmError


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The Transformer blocks inside ``module`` (ViT blocks, encoder and decoder layers), outermost first."""
    from histofm.models.transformer import TransformerDecoderLayer, TransformerEncoderLayer
    from histofm.models.vit import Block

    kinds = (Block, TransformerEncoderLayer, TransformerDecoderLayer)
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, kinds):
                found.append(child)  # do not look inside a block
            else:
                visit(child)

    visit(module)
    return found


def compile_blocks(module: nn.Module, *, mode: str | None = None, dynamic: bool | None = None) -> int:
    """Compile every repeated block of ``module`` in place (``nn.Module.compile``).

    Args:
        module: any model; its blocks are found with :func:`repeated_blocks`.
        mode: ``torch.compile`` mode (``None``, ``"max-autotune"``, ``"reduce-overhead"`` ...).
        dynamic: ``torch.compile``'s dynamic-shape setting.

    Returns:
        The number of compiled blocks (0: the module had none and was compiled whole).
    """
    blocks = repeated_blocks(module)
    for block in blocks:
        block.compile(mode=mode, dynamic=dynamic)
    if not blocks:
        module.compile(mode=mode, dynamic=dynamic)
    return len(blocks)


def grad_checkpointing(module: nn.Module, enable: bool = True) -> int:
    """Turn activation checkpointing on (or off) in every backbone inside ``module``.

    Each block's activations are recomputed during backward instead of stored:
    activation memory of a ViT falls from ``depth`` blocks' worth to about one, for
    about a third more compute. Returns the number of backbones switched.
    """
    n = 0
    for m in module.modules():
        if hasattr(m, "set_grad_checkpointing"):
            m.set_grad_checkpointing(enable)
            n += 1
    return n


def channels_last(module: nn.Module) -> nn.Module:
    """Store the 4-d weights of ``module`` channels-last (in place); feed it ``x.contiguous(memory_format=...)``."""
    return module.to(memory_format=torch.channels_last)


def shard_fsdp(module: nn.Module, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``module`` with FSDP2 over all ranks of the default process group (in place).

    Every repeated block is its own FSDP unit, then the root takes the remaining
    parameters. Parameters become ``DTensor`` shards, so build the optimiser AFTER
    this call. Frozen parameters (an EMA teacher) are sharded the same way as the
    trainable ones of the same shape, so element-wise updates such as
    ``teacher = m * teacher + (1 - m) * student`` stay local to each rank.

    Args:
        module: the model (its ``forward`` must be what the training step calls).
        reshard_after_forward: free gathered block parameters after each forward
            (least memory; ``False`` keeps them until backward, less communication).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise HistofmError("FSDP needs a process group: start the run with torchrun (or use parallel='ddp').")
    from torch.distributed.fsdp import fully_shard

    for block in repeated_blocks(module):
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(module, reshard_after_forward=reshard_after_forward)
    return module


def is_fsdp(module: nn.Module) -> bool:
    """True when ``module`` was sharded with FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(module, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded ``DTensor`` (a collective: call it on every rank)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every sharded entry gathered, on CPU (collective under FSDP)."""
    return {k: full_tensor(v.detach()).cpu() for k, v in module.state_dict().items()}


def unsharded(module: nn.Module) -> Iterator[None]:
    """Context manager: the FSDP root's own parameters gathered, for calls that bypass ``forward``.

    The blocks gather their parameters themselves when they run; the root group's
    (patch embedding, position embedding, final norm, heads) are only gathered by the
    root's ``forward``. Calls such as ``method.embed(x)`` need them too. A no-op for
    modules that are not sharded.
    """
    import contextlib

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        if not is_fsdp(module):
            yield
            return
        module.unshard()
        try:
            yield
        finally:
            module.reshard()

    return ctx()

