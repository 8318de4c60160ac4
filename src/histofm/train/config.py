"""The training configuration: one frozen dataclass, overridden with ``dataclasses.replace``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from histofm.errors import HistofmError
from histofm.settings import SettingError, check_config, config_replace, setting

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
        nesterov: Nesterov momentum for ``"sgd"`` (FixMatch's optimiser).
        lr_schedule: ``"cosine"`` (the warm-up and half cosine above) or ``"fixmatch"``
            (``lr * cos(7 pi k / 16 K)``, Sohn et al. 2020; no warm-up, ``min_lr`` unused).
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
        eval_every: with an ``evaluate`` callable given to ``fit``, evaluate every N steps and after the
            last step (0: after the last step only); its metrics join that step's log record.
        best_metric: a metric of the evaluation to keep the best weights by; they are loaded back at
            the end of the run (``None``: the last weights are kept).
        best_mode: ``"min"`` (lower is better, losses) or ``"max"`` (accuracies).
        patience: stop after this many evaluations in a row without a better ``best_metric``
            (0: never stop early; needs ``best_metric``).
    """

    steps: int = setting(1000, range=">= 1")
    batch_size: int = setting(64, range=">= 1")
    lr: float = setting(5e-4, range=">= 0")
    min_lr: float = setting(1e-6, range=">= 0")
    warmup_steps: int = setting(0, range=">= 0")
    warmup_lr_start: float = setting(0.0, range=">= 0")
    weight_decay: float = setting(0.04, range=">= 0")
    weight_decay_end: float | None = setting(None, range=">= 0")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = setting((0.9, 0.999), range="[0, 1)")
    nesterov: bool = False
    lr_schedule: Literal["cosine", "fixmatch"] = "cosine"
    precision: Precision = "fp32"
    grad_clip: float | None = setting(3.0, range="> 0")
    seed: int = setting(0, range="[0, 4294967295]")
    out_dir: str | None = None
    ckpt_every: int = setting(500, range=">= 0")
    log_every: int = setting(10, range=">= 1")
    monitor_every: int = setting(100, range=">= 0")
    monitor_samples: int = setting(128, range=">= 2")
    resume: bool = False
    max_nonfinite: int = setting(5, range=">= 1")
    stop_after: int | None = setting(None, range=">= 1")
    num_workers: int = setting(0, range="[0, 256]")
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    parallel: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False
    grad_checkpointing: bool = False
    find_unused_parameters: bool = False
    sync_batchnorm: bool = True
    eval_every: int = setting(0, range=">= 0")
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    patience: int = setting(0, range=">= 0")

    def __post_init__(self) -> None:
        check_config(self)  # types and ranges declared above
        if self.warmup_steps > self.steps:
            raise SettingError("warmup_steps", f"must be at most steps={self.steps}, got {self.warmup_steps}")
        if self.resume and self.out_dir is None:
            raise HistofmError("resume=True needs out_dir (where the checkpoint is).")
        if self.patience > 0 and self.best_metric is None:
            raise SettingError("patience", "needs best_metric (the evaluation metric to wait for)")

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
