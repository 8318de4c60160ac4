"""The one engine: the only place that moves tensors, scales, steps and saves.

``fit(objective, data, cfg)`` runs ``cfg.steps`` optimiser steps of an
:class:`~histofm.utils.objective.Objective`: a self-supervised method
(:class:`~histofm.methods.base.SSLMethod`), a semi-supervised objective or a MIL
slide objective. One step, written out::

    batch  = next(loader) -> device
    lr, wd = cosine schedules of the step (after linear warm-up)
    with autocast(bf16 | fp16 | off):
        out = objective(batch)               # dict; out["loss"] is minimised
    if loss is not finite: skip the step (stop after max_nonfinite in a row)
    backward (fp16: through the loss scaler), clip the gradient norm, optimiser step
    objective.on_step_end(step, steps)       # EMA teachers, queues, temperature schedules
    every eval_every steps: metrics = evaluate()   # logged; best weights kept, early stopping

Conventions for objectives:

* ``out["loss"]`` is the total to minimise. Keys starting with ``aux_`` (for
  example ``aux_koleo``, ``aux_moe_balance``) are auxiliary terms that the method
  has ALREADY added into ``"loss"``; the engine only logs them, as it logs every
  other scalar entry. The one exception: mixture-of-experts losses left in MoE
  layers (``histofm.layers.moe``) are added by the engine when the method did not.
* Per-step schedules that belong to the method run in ``on_step_end`` with the
  global step (0-based, the step just taken) and ``cfg.steps``; use the helpers of
  :mod:`histofm.utils.schedules` and :func:`histofm.utils.ema.ema_update`.

Evaluation and early stopping: given ``evaluate`` (a callable returning a dict of
metrics, run in eval mode without gradients and without touching the training random
state), the engine calls it every ``cfg.eval_every`` steps and after the last step, and
adds the metrics to that step's record. With ``cfg.best_metric`` it keeps the weights of
the best evaluation (:mod:`histofm.train.best`), stops after ``cfg.patience`` evaluations
without improvement, and loads the best weights back at the end.

Outputs in ``cfg.out_dir``: ``checkpoint.pt`` (every ``ckpt_every`` steps and at
the end; ``resume=True`` continues from it exactly: weights, optimiser, scaler,
random states of every rank, data position, history, best weights and patience
count), ``log.jsonl``, ``loss_curve.png``, the objective's exported module
(``backbone.safetensors`` + ``backbone.json`` for a method) and ``config.json``. Under ``torchrun`` the method is wrapped in
DistributedDataParallel (``parallel="ddp"``) or sharded with FSDP2
(``parallel="fsdp"``, :func:`histofm.accel.shard_fsdp`), every rank reads its
slice of each global batch, and only rank 0 writes files. Checkpoints always hold
full (unsharded) tensors keyed by parameter name, so a run may resume with another
number of ranks or the other parallel mode. ``compile=True`` compiles each
Transformer block (:func:`histofm.accel.compile_blocks`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from histofm import accel
from histofm.errors import HistofmError
from histofm.layers.moe import add_aux_losses
from histofm.train.best import BestWeights
from histofm.train.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng,
    export_backbone,
    load_training_state,
    restore_rng,
    save_training_state,
)
from histofm.train.config import TrainConfig
from histofm.train.data import SampleTrace, SeededViews, StepBatchSampler, is_step_stream, to_device
from histofm.train.logs import RunLogger, TrainProgress, plot_loss_curve
from histofm.train.monitor import first_image_batch, monitor_batch, monitor_step, stream_monitor_batch
from histofm.train.optim import build_optimizer
from histofm.train.resume import (
    check_resume_config,
    check_resume_run,
    full_states,
    load_full_weights,
    load_states,
    objective_name,
)
from histofm.utils import atomic_path, default_device, seed_everything
from histofm.utils import distributed as dist_utils
from histofm.utils.objective import Objective, has_embed
from histofm.utils.schedules import cosine_schedule, fixmatch_cosine

History = list[dict[str, Any]]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA (this rank's GPU under torchrun), MPS or CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        dev = default_device()
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise HistofmError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and dev.index is None:
        import os

        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def fit(
    method: Objective,
    data: Any,  # noqa: ANN401
    cfg: TrainConfig,
    *,
    transform: Callable[[Any], Any] | None = None,
    monitor_images: torch.Tensor | None = None,
    collate: Callable[[list[Any]], Any] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    label: str = "pretrain",
    run_info: dict[str, Any] | None = None,
) -> History:
    """Train ``method`` for ``cfg.steps`` optimiser steps and return the per-step history.

    Args:
        method: the objective to train (an SSL method, a semi-supervised or a MIL objective);
            its :meth:`~histofm.utils.objective.Objective.exported_module` is saved at the end.
        data: a map-style dataset (items: PIL images, tensors, or ``(image, *rest)`` tuples), a
            step stream (an ``IterableDataset`` with ``plan_steps``, e.g.
            :class:`histofm.data.shards.ShardStream`; protocol in :mod:`histofm.train.data`), or a
            ready ``DataLoader``. With a dataset or a step stream the engine fixes data order and
            augmentation seeds, so ``resume`` is exact; a ``DataLoader`` is cycled as is (its own order).
        cfg: the training configuration.
        transform: per-sample view transform applied to each dataset item (the one returned by
            the method's ``build``); ignored with a ``DataLoader``.
        monitor_images: images ``(N, 3, H, W)`` for the collapse watch; by default the first view
            of ``cfg.monitor_samples`` fixed samples. Objectives without ``embed`` are not watched.
        collate: how a map-style dataset's samples become a batch (default: torch's
            ``default_collate``; MIL pads bags of different sizes).
        evaluate: returns metrics (``{"val_loss": ...}``), called every ``cfg.eval_every`` steps and
            after the last one, in eval mode, without gradients, the training RNG untouched; under
            ``torchrun`` rank 0's metrics count.
        label: the progress bar's label.
        run_info: what else must not change when the run resumes (plain values keyed by how the
            user sets them, e.g. ``{"--data": "/data/tiles (1200 samples)"}``): stored in the
            checkpoint; a resume with another value is refused naming the key and both values.

    Returns:
        One dict per step: ``step`` (0-based), ``loss``, every other scalar the method returned,
        ``lr``, ``wd``, ``grad_norm``, ``skipped``, ``embed_std``/``rankme`` on monitored steps, and
        the evaluation's metrics (with ``best_step``, ``best_<metric>``) on evaluated steps.
        After a resume the history includes the steps before the interruption. A run stopped
        early has fewer than ``cfg.steps`` records.
    """
    if not isinstance(method, Objective):
        raise HistofmError(f"fit() needs an Objective (an SSLMethod, a semi-supervised or MIL objective), got {type(method).__name__}.")
    distributed = dist_utils.init_from_env(resolve_device(cfg.device).type)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device.type == "cpu":
        warnings.warn("fp16 autocast on CPU is slow and unsupported by many kernels; prefer bf16.", stacklevel=2)
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    main = rank == 0
    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)

    method.to(device)
    fsdp = distributed and cfg.parallel == "fsdp"
    if cfg.parallel == "fsdp" and not distributed:
        warnings.warn("parallel='fsdp' needs several processes (torchrun); training on this one", stacklevel=2)
    if cfg.grad_checkpointing and not accel.grad_checkpointing(method):
        warnings.warn("grad_checkpointing=True but no backbone of this method supports it", stacklevel=2)
    if cfg.batch_size < method.min_batch_size:
        raise HistofmError(f"batch_size={cfg.batch_size} is too small for {type(method).__name__}, which needs at "
                           f"least {method.min_batch_size} samples per step; raise batch_size.")
    if cfg.best_metric is not None and evaluate is None:
        raise HistofmError(f"best_metric={cfg.best_metric!r} needs an evaluate callable passed to fit(); "
                           "pass one or set best_metric to None.")
    if fsdp:
        accel.shard_fsdp(method)  # parameters become shards: build the optimiser after this
    if cfg.compile:
        accel.compile_blocks(method)
    params = method.trainable_parameters()
    if not params:
        raise HistofmError("The method has no trainable parameters.")
    optimizer = build_optimizer(method, params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    # ---------------------------------------------------------------- resume
    start_step, history, streak = 0, [], 0
    best = BestWeights(cfg.best_metric, cfg.best_mode, cfg.patience)
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    state = None
    if cfg.resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_training_state(ckpt_path)
        check_resume_run(state, run_info or {}, objective_name(method), out_dir)
        check_resume_config(state.get("config", {}), cfg)
        load_states(method, optimizer, state, fsdp)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step, history, streak = int(state["step"]), list(state["history"]), int(state.get("nonfinite_streak", 0))
        if state.get("best") is not None:
            best.load_state_dict(state["best"])
    elif cfg.resume and main:
        print(f"histofm: no checkpoint in {out_dir}; starting from step 0.")
    if out_dir is not None and main:
        with atomic_path(out_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    stop_step = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    if best.stopped:  # the checkpoint of a run that stopped early: nothing left to train
        stop_step = start_step
    watch = cfg.monitor_every > 0 and has_embed(method)

    # ------------------------------------------------------------------ data
    streaming = is_step_stream(data)
    if streaming:  # an IterableDataset whose batches are a pure function of the step (histofm.train.data)
        saved = (state.get("world_size", world), state.get("config", {}).get("num_workers", cfg.num_workers)) if state else None
        if saved is not None and saved != (world, cfg.num_workers):
            warnings.warn("resuming a step stream with another number of processes or workers: "
                          "the sample order differs from the interrupted run's from here on", stacklevel=2)
        data.plan_steps(seed=cfg.seed, global_batch=cfg.batch_size, rank=rank, world_size=world,
                        num_workers=cfg.num_workers, start_step=start_step, stop_step=stop_step,
                        views=SeededViews(None, transform, cfg.seed).apply if transform is not None else None)
        sampler = None
        loader = DataLoader(data, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        if monitor_images is None and watch:
            monitor_images = stream_monitor_batch(data, transform, cfg)
    elif isinstance(data, DataLoader):
        loader, sampler = data, None
        if monitor_images is None and watch:
            monitor_images = first_image_batch(next(iter(data)), cfg.monitor_samples)
    else:
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise HistofmError("fit() needs a map-style dataset (with __len__ and __getitem__) or a DataLoader.")
        sampler = StepBatchSampler(
            len(data), cfg.batch_size, seed=cfg.seed, start_step=start_step, stop_step=stop_step,
            rank=rank, world_size=world,
        )
        if transform is None and len(data) and _is_pil(data[0]):
            raise HistofmError("The dataset yields PIL images: pass the method's view transform (transform=...).")
        views = SeededViews(data, transform, cfg.seed)
        loader = DataLoader(
            views, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate or default_collate,
            pin_memory=device.type == "cuda", persistent_workers=False,
        )
        if monitor_images is None and watch:
            monitor_images = monitor_batch(views, len(data), cfg)

    # The loader's iterator draws a base seed from the global RNG: create it before seeding.
    it = _cycle(loader) if sampler is None and not streaming else iter(loader)

    # RNG: fresh seeds per rank, or exactly the saved state of this rank.
    if state is not None:
        rngs = state["rng"]
        restore_rng(rngs[rank] if rank < len(rngs) else rngs[0])
    else:
        seed_everything(cfg.seed + rank)

    model: nn.Module = method
    if distributed and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if device.type == "cuda" and cfg.sync_batchnorm:
            # BatchNorm in projectors (MoCo v3, SimCLR) must see the global batch, as on one device.
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        model = DDP(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )

    logger = RunLogger(out_dir if main else None, resume_step=start_step, tensorboard=cfg.tensorboard)
    autocast_dtype = _DTYPES.get(cfg.precision)

    def save(next_step: int) -> None:
        rngs = dist_utils.all_gather_object(capture_rng())
        method_state, optim_state = full_states(method, optimizer, fsdp)  # collective under FSDP
        if main and ckpt_path is not None:
            save_training_state(
                ckpt_path,
                {
                    "step": next_step,
                    "method": method_state,
                    "optimizer": optim_state,
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "rng": rngs,
                    "nonfinite_streak": streak,
                    "best": best.state_dict() if best.metric is not None else None,
                    "world_size": world,
                    "config": cfg.to_dict(),
                    "objective": objective_name(method),
                    "run": dict(run_info or {}),
                    "history": history,
                },
            )
        dist_utils.barrier()

    def full_weights() -> dict[str, torch.Tensor]:
        """The weights to keep as the best so far; under FSDP a collective after which EVERY rank holds them
        in full (no cpu_offload, which would leave other ranks empty), so each can load them back at the end."""
        if not fsdp:
            return method.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(method, options=StateDictOptions(full_state_dict=True))

    progress = TrainProgress(enabled=cfg.progress and main, total=stop_step, start=start_step, label=label,
                             metric=cfg.best_metric)
    trace = SampleTrace(rank)
    method.train()
    t_last, n_last = time.perf_counter(), 0
    end_step = start_step  # the steps done when the loop ends (early stopping ends it before stop_step)
    try:
        for step in range(start_step, stop_step):
            batch = next(it)
            if streaming:
                batch, keys = batch
                trace.record(step, keys)
            batch = to_device(batch, device)
            lr = (fixmatch_cosine(step, cfg.steps, cfg.lr) if cfg.lr_schedule == "fixmatch" else
                  cosine_schedule(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.warmup_lr_start))
            wd = cfg.weight_decay if cfg.weight_decay_end is None else cosine_schedule(
                step, cfg.steps, cfg.weight_decay, cfg.weight_decay_end
            )
            for g in optimizer.param_groups:
                g["lr"] = lr
                if g.get("apply_wd", True):
                    g["weight_decay"] = wd

            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = model(batch)
            if not isinstance(out, dict) or "loss" not in out:
                raise HistofmError(f"{type(method).__name__}.forward must return a dict with a 'loss' entry.")
            # Mixture-of-experts balancing / z losses that the method did not add itself (a no-op
            # for models without MoE layers, and for methods that already called it).
            out = add_aux_losses(out, method)
            loss = out["loss"]
            finite = _all_finite(loss.detach().float())
            grad_norm = float("nan")
            if finite:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
                grad_norm = float(accel.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
                finite = math.isfinite(grad_norm) or scaler.is_enabled()  # the scaler skips inf steps itself
            if finite:
                scaler.step(optimizer)
                scaler.update()
                streak = 0
            else:
                streak += 1
                warnings.warn(f"non-finite loss or gradient at step {step}; step skipped", stacklevel=2)
            optimizer.zero_grad(set_to_none=True)
            method.on_step_end(step, cfg.steps)

            record = {"step": step, **_scalars(out), "lr": lr, "wd": wd, "grad_norm": grad_norm, "skipped": not finite}
            # Under FSDP every rank takes part in the monitor's forward (its parameters are sharded).
            if watch and monitor_images is not None and (main or fsdp) and (
                step % cfg.monitor_every == 0 or step == cfg.steps - 1
            ):
                record.update(monitor_step(method, monitor_images, device, autocast_dtype))
            evaluated = evaluate is not None and (
                step == cfg.steps - 1 or (cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0)
            )
            if evaluated:
                metrics = _evaluate(method, evaluate, device, autocast_dtype)
                record.update(metrics)
                record.update(best.update(step, metrics, full_weights))
            history.append(record)
            n_last += 1
            if main and (step % cfg.log_every == 0 or step == stop_step - 1 or evaluated or best.stopped):
                now = time.perf_counter()
                per_step = (now - t_last) / n_last
                logger.log({**record, "sec_per_step": per_step, "samples_per_sec": cfg.batch_size / max(per_step, 1e-9)})
                t_last, n_last = now, 0
            progress.update(step + 1, record)

            if streak >= cfg.max_nonfinite:
                if not _any_step_taken(history):
                    raise _never_finite(step + 1)  # nothing learnt: nothing saved or exported
                save(step + 1)
                _export(method, out_dir, main, fsdp, {"steps": step + 1, "stopped": "non-finite loss"})
                where = f"; checkpoint saved in {out_dir}" if out_dir is not None else ""
                fp32 = "" if cfg.precision == "fp32" else " or use fp32"
                weights_ok = all(bool(torch.isfinite(q).all()) for q in params)
                advice = (f"lower the learning rate{fp32}, then resume, or start again in another out_dir if the "
                          "weights have already diverged" if weights_ok else
                          "the weights are no longer finite, so resuming cannot help: start again with a lower "
                          f"learning rate{fp32} in another out_dir")
                raise HistofmError(
                    f"The loss was not finite for {streak} step{'s' if streak > 1 else ''} in a row (up to step {step}, "
                    f"max_nonfinite={cfg.max_nonfinite}){where}; {advice}."
                )
            end_step = done = step + 1
            if best.stopped:
                break
            if ckpt_path is not None and cfg.ckpt_every > 0 and done % cfg.ckpt_every == 0 and done < stop_step:
                save(done)
    finally:
        progress.close()
        logger.close()
        trace.close()

    if end_step > start_step and not _any_step_taken(history):
        raise _never_finite(end_step)
    if ckpt_path is not None and end_step > start_step:
        save(end_step)  # the last weights (the best ones travel beside them)
    if best.weights is not None:
        load_full_weights(method, best.weights, fsdp)
    extra: dict[str, Any] = {"steps": end_step, "finished": end_step >= cfg.steps or best.stopped,
                             "skipped_steps": skipped_steps(history)}
    if best.metric is not None:
        extra.update({"best_metric": best.metric, "best_value": best.value, "best_step": best.step,
                      "stopped_early": best.stopped})
    _export(method, out_dir, main, fsdp, extra)
    if main and out_dir is not None:
        if history:
            plot_loss_curve(history, out_dir / "loss_curve.png", title=f"{type(method).__name__}: training loss")
    return history


# ------------------------------------------------------------------------ helpers
def _any_step_taken(history: list[dict[str, Any]]) -> bool:
    """Whether any optimiser step of the run (resumed ones included) had a finite loss."""
    return any(not h.get("skipped", False) for h in history)


def _never_finite(steps: int) -> HistofmError:
    return HistofmError(
        f"The loss was not finite at any of the {steps} step{'s' if steps > 1 else ''} run, so nothing was learnt "
        "and nothing exported; "
        "check the method's settings (temperatures, learning rate) and the data."
    )


@torch.no_grad()
def _evaluate(
    method: Objective, evaluate: Callable[[], dict[str, float]], device: torch.device, dtype: torch.dtype | None
) -> dict[str, float]:
    """Run ``evaluate`` in eval mode under the training precision, leaving the training RNG as it was."""
    was_training = method.training
    method.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.autocast(
            device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            metrics = {k: float(v) for k, v in evaluate().items()}
    finally:
        method.train(was_training)
    return dist_utils.all_gather_object(metrics)[0]  # every rank follows rank 0's decision


def _export(method: Objective, out_dir: Path | None, main: bool, fsdp: bool, extra: dict[str, Any]) -> None:
    """Write the objective's exported module on rank 0 (under FSDP every rank first helps gather the shards).

    Raises:
        HistofmError: a weight is not finite (such a module is never written).
    """
    module = method.exported_module()
    if out_dir is None or module is None:
        return
    name = method.export_name
    tensors = accel.full_state_dict(module) if fsdp else None
    if main:
        state = tensors if tensors is not None else module.state_dict()
        bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise HistofmError(f"The {name}'s weight {bad} is not finite after training; nothing was exported "
                               "(lower the learning rate or use fp32).")
        export_backbone(module, out_dir, {**method.export_info(), **extra}, state_dict=tensors, name=name)


def skipped_steps(history: list[dict[str, Any]]) -> int:
    """How many steps of a run (resumed ones included) were skipped for a non-finite loss or gradient."""
    return sum(bool(h.get("skipped", False)) for h in history)


def _all_finite(x: torch.Tensor) -> bool:
    ok = torch.isfinite(x).all().float()
    if dist_utils.is_distributed():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)  # all ranks skip together
    return bool(ok.item())


def _scalars(out: dict[str, Any]) -> dict[str, float]:
    rec = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            rec[k] = float(dist_utils.all_reduce_mean(v.detach().float()))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            rec[k] = float(v)
    return rec


def _is_pil(item: Any) -> bool:  # noqa: ANN401
    first = item[0] if isinstance(item, (tuple, list)) and item else item
    return type(first).__module__.startswith("PIL.")


def _cycle(loader: DataLoader) -> Any:  # noqa: ANN401
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


