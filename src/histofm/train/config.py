"""The training configuration: one frozen dataclass, overridden with ``dataclasses.replace``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from histofm.errors import HistofmError

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything the engine needs besides the method and the data.

    Schedules: the learning rate warms up linearly from ``warmup_lr_start`` to ``lr``
    over ``warmup_steps``, then follows a half cosine down to ``min_lr``; the weight
    decay follows a half cosine from ``weight_decay`` to ``weight_decay_end``
    (``None``: constant).

    Attributes:
        steps: optimiser steps in total (the run's length, also after a resume).
        batch_size: GLOBAL batch size; under ``torchrun`` each of ``W`` ranks sees
            ``batch_size / W`` samples, so results do not depend on the number of ranks.
        lr, min_lr, warmup_steps, warmup_lr_start: learning-rate schedule.
        weight_decay, weight_decay_end: weight-decay schedule (norms, biases and tokens never decay).
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        betas: AdamW betas.
        precision: ``"fp32"``, ``"bf16"`` (autocast; fine on CPU) or ``"fp16"`` (autocast + loss scaling, CUDA).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        seed: seeds model-side randomness and, with the epoch and sample index, every augmentation.
        out_dir: where checkpoints, ``log.jsonl``, ``loss_curve.png`` and the final backbone go
            (``None``: nothing is written).
        ckpt_every: write ``checkpoint.pt`` every N steps (and at the end); 0 disables.
        log_every: write a JSONL record every N steps.
        monitor_every: compute the collapse watch (embedding std, RankMe) every N steps; 0 disables.
        monitor_samples: size of the fixed monitoring batch.
        resume: continue from ``out_dir/checkpoint.pt`` when it exists.
        max_nonfinite: stop after this many non-finite losses in a row.
        stop_after: stop (with a checkpoint) after this global step, as if interrupted; for tests and
            for splitting a long run into jobs. The schedules still run to ``steps``.
        num_workers: data-loading worker processes.
        device: ``"auto"`` (CUDA, then MPS, then CPU) or a torch device string.
        progress: show a rich progress bar (on the main process).
        tensorboard: also log to TensorBoard when it is installed.
        parallel: with several processes (``torchrun``): ``"ddp"`` (DistributedDataParallel, a full
            replica per rank) or ``"fsdp"`` (FSDP2: parameters, gradients and optimiser states
            sharded over the ranks, each Transformer block its own unit; for ViT-L and larger).
            Both give the single-process result for the same global batch.
        compile: ``torch.compile`` each Transformer block (regional compilation; the first steps
            include the compilation).
        grad_checkpointing: recompute each block's activations in backward instead of storing
            them (less memory for large backbones, about a third more compute).
        find_unused_parameters: passed to DistributedDataParallel.
        sync_batchnorm: under multi-GPU data parallelism, convert BatchNorm layers to SyncBatchNorm
            (CPU/gloo has no SyncBatchNorm: there each rank normalises its own slice).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    warmup_lr_start: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    precision: Precision = "fp32"
    grad_clip: float | None = 3.0
    seed: int = 0
    out_dir: str | None = None
    ckpt_every: int = 500
    log_every: int = 10
    monitor_every: int = 100
    monitor_samples: int = 128
    resume: bool = False
    max_nonfinite: int = 5
    stop_after: int | None = None
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    parallel: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False
    grad_checkpointing: bool = False
    find_unused_parameters: bool = False
    sync_batchnorm: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise HistofmError(f"steps must be at least 1, got {self.steps}.")
        if self.batch_size < 2:
            raise HistofmError(f"batch_size must be at least 2, got {self.batch_size}.")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise HistofmError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}.")
        if self.optimizer not in ("adamw", "sgd"):
            raise HistofmError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}.")
        if self.parallel not in ("ddp", "fsdp"):
            raise HistofmError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}.")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise HistofmError(f"warmup_steps must be between 0 and steps={self.steps}, got {self.warmup_steps}.")
        if self.resume and self.out_dir is None:
            raise HistofmError("resume=True needs out_dir (where the checkpoint is).")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed; an unknown field raises :class:`HistofmError`."""
        return config_replace(self, changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of all fields."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (YAML/JSON); unknown keys raise :class:`HistofmError`."""
        return config_replace(cls(), d)


def config_replace(cfg: Any, changes: dict[str, Any]) -> Any:
    """``dataclasses.replace`` that coerces simple types and names the bad key in a clear error."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise HistofmError(
            f"Unknown option(s) {', '.join(unknown)} for {type(cfg).__name__}; "
            f"valid ones are {', '.join(sorted(fields))}."
        )
    fixed = {k: _coerce(getattr(cfg, k), v, k) for k, v in changes.items()}
    return dataclasses.replace(cfg, **fixed)


def _coerce(current: Any, value: Any, key: str) -> Any:
    """Coerce ``value`` (often a string from ``--set key=value``) to the type of ``current``."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(current, bool) and isinstance(value, str):
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise HistofmError(f"Option {key} expects true or false, got {value!r}.")
    if isinstance(value, str) and value.lower() in ("none", "null") and not isinstance(current, str):
        return None
    try:
        if isinstance(current, bool):
            return value
        if isinstance(current, int) and isinstance(value, str):
            return int(value)
        if isinstance(current, float) and isinstance(value, (str, int)):
            return float(value)
        if isinstance(current, tuple) and isinstance(value, (list, str)):
            items = value.split(",") if isinstance(value, str) else value
            return tuple(type(current[0])(v) for v in items) if current else tuple(items)
        if current is None and isinstance(value, str):
            try:
                return float(value) if any(c in value for c in ".e") else int(value)
            except ValueError:
                return value
    except (TypeError, ValueError):
        raise HistofmError(f"Option {key} expects a {type(current).__name__}, got {value!r}.") from None
    return value
