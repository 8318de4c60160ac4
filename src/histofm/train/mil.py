"""MIL training through the one engine: one aggregator (:func:`fit_bags`) and patient-grouped cross-validation.

MIL's own parts live on floor 8 (:mod:`histofm.mil.train`: the objective, bag collate,
prediction; :mod:`histofm.mil.cv`: folds, validation split, summaries). This module wires
them to :func:`histofm.train.fit`, which gives MIL what pretraining has: exact resume
after a kill, bf16/fp16 (``MILTrainConfig.precision``), the non-finite guard (a step whose
loss is NaN or infinite is skipped with a warning; ``max_nonfinite`` in a row stop the run
in one sentence), ``log.jsonl``, ``loss_curve.png`` and the progress bar. The learning rate
is constant (``min_lr = lr``) and gradients are not clipped, as MIL trained before.

An epoch is ``len(bags) // batch_size`` engine steps over a fresh permutation of the bags
(a remainder smaller than a batch waits for a later epoch). After every epoch the engine
evaluates the validation loss, keeps the weights of the best epoch, stops after
``patience`` epochs without improvement and writes ``checkpoint.pt``.

:func:`cross_validate` writes, atomically, into ``out_dir``:

* ``progress.json`` while it runs, and ``fold_K/`` for fold K: the engine's folder
  (``checkpoint.pt`` while the fold trains, so a killed run resumes mid-fold; the fold's
  per-step ``log.jsonl``, ``loss_curve.png``, ``config.json`` and ``aggregator.safetensors``);
* ``fold_K.safetensors``: each fold's model (the best validation epoch);
* ``log.jsonl``: one record per fold and epoch (training and validation loss, best epoch);
* ``predictions.csv``: every slide once, scored by the fold model that held it out;
* ``metrics.json``: per fold and pooled out-of-fold, each metric with a 95% bootstrap
  interval over slides, and the mean +/- sd over folds;
* ``config.json``: aggregator, options, classes, settings, the features' provenance,
  written only when every fold is done;
* ``run.json``: the manifest of this run's models, written last (see :mod:`histofm.mil.run`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofm.errors import HistofmError
from histofm.mil.base import MILAggregator, build_aggregator
from histofm.mil.cv import (
    data_fingerprint,
    fold_targets,
    make_folds,
    output_dim,
    summarise_fold,
    validation_split,
    write_results,
)
from histofm.mil.data import SlideTable
from histofm.mil.run import abandon_run, begin_run, finish_run, fold_dir, fold_done, save_weights, sha256
from histofm.mil.survival import check_loss
from histofm.mil.train import (
    BagCollate,
    BagSamples,
    MILObjective,
    MILTrainConfig,
    Targets,
    TileSubset,
    class_weights,
    predict_logits,
    subset,
    validation_loss,
)
from histofm.train.checkpoint import CHECKPOINT_NAME
from histofm.train.config import TrainConfig
from histofm.train.loop import fit
from histofm.utils import atomic_path, seed_everything


def engine_config(config: MILTrainConfig, n_bags: int, device: str | torch.device, *, out_dir: Path | None,
                  resume: bool, progress: bool, validate: bool) -> TrainConfig:
    """The engine's settings for a MIL run: constant learning rate, one checkpoint and evaluation per epoch."""
    if n_bags < config.batch_size:
        raise HistofmError(f"The training part has {n_bags} slides, fewer than one batch of {config.batch_size}; "
                           "lower --batch-size or add slides.")
    per_epoch = n_bags // config.batch_size
    return TrainConfig(
        steps=config.epochs * per_epoch, batch_size=config.batch_size, lr=config.lr, min_lr=config.lr,
        weight_decay=config.weight_decay, precision=config.precision, grad_clip=None, seed=config.seed,  # type: ignore[arg-type]
        out_dir=None if out_dir is None else str(out_dir), ckpt_every=per_epoch, log_every=per_epoch,
        monitor_every=0, resume=resume, device=str(device), progress=progress, tensorboard=False,
        eval_every=per_epoch, best_metric="val_loss" if validate else None,
        patience=config.patience if validate else 0,
    )


def epoch_records(history: list[dict[str, Any]], steps_per_epoch: int) -> list[dict[str, Any]]:
    """One record per epoch from the engine's per-step history: ``epoch``, ``train_loss``, ``val_loss``, ``best_epoch``."""
    records = []
    for e in range(math.ceil(len(history) / steps_per_epoch)):
        steps = history[e * steps_per_epoch : (e + 1) * steps_per_epoch]
        losses = [h["loss"] for h in steps if not h.get("skipped") and math.isfinite(h["loss"])]
        rec: dict[str, Any] = {"epoch": e, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                               "val_loss": steps[-1].get("val_loss")}
        if steps[-1].get("best_step") is not None:
            rec["best_epoch"] = int(steps[-1]["best_step"]) // steps_per_epoch
        records.append(rec)
    return records


def fit_bags(
    model: MILAggregator,
    bags: Sequence[torch.Tensor],
    labels: Sequence[int] | np.ndarray | torch.Tensor | Targets,
    config: MILTrainConfig = MILTrainConfig(),
    device: str | torch.device = "cpu",
    progress: bool = False,
    *,
    val_bags: Sequence[torch.Tensor] | None = None,
    val_labels: Sequence[int] | np.ndarray | torch.Tensor | Targets | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    label: str | None = None,
    shuffle_tiles: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` on bags ``(N_i, D)`` through the engine; returns one record per epoch run.

    With ``val_bags`` the validation loss is computed after each epoch, the weights of the best
    epoch are loaded back at the end, and training stops after ``config.patience`` epochs
    without improvement. With ``out_dir`` the engine writes its checkpoint, ``log.jsonl`` and
    ``aggregator.safetensors`` there, and ``resume=True`` continues a killed run exactly.
    ``shuffle_tiles`` gives every training bag a fresh tile order each time it is drawn
    (:class:`~histofm.mil.train.TileSubset`).

    Returns:
        ``[{"epoch", "train_loss", "val_loss", "best_epoch"?}, ...]``.

    Raises:
        HistofmError: no bags, a label count that does not match, a NaN validation loss, or
            ``max_nonfinite`` non-finite training steps in a row.
    """
    target = labels if isinstance(labels, Targets) else Targets.classes(labels)
    if len(bags) != len(target) or not len(bags):
        raise HistofmError(f"fit_bags() needs one label per bag and at least one bag, got {len(bags)} bags and "
                           f"{len(target)} labels.")
    val_target = None if val_labels is None else (
        val_labels if isinstance(val_labels, Targets) else Targets.classes(val_labels))
    validate = val_bags is not None and val_target is not None and len(val_bags) > 0
    objective = MILObjective(model, config, class_weights(target, model.num_classes, config))
    out = None if out_dir is None else Path(out_dir)
    cfg = engine_config(config, len(bags), device, out_dir=out, progress=progress, validate=validate,
                        resume=resume and out is not None and (out / CHECKPOINT_NAME).is_file())

    def evaluate() -> dict[str, float]:
        val = validation_loss(model, val_bags, val_target, config, objective.class_weight,  # type: ignore[arg-type]
                              next(model.parameters()).device)
        if not math.isfinite(val):
            raise HistofmError(f"The validation loss of {config.model} became {val} (diverging training); "
                               f"lower --lr (now {config.lr:g}) and train again.")
        return {"val_loss": val}

    history = fit(objective, BagSamples(bags), cfg,
                  transform=TileSubset(config.max_tiles, shuffle_tiles)
                  if config.max_tiles is not None or shuffle_tiles else None,
                  collate=BagCollate(target), evaluate=evaluate if validate else None,
                  label=label or f"training {config.model}")
    model.eval()
    return epoch_records(history, cfg.ckpt_every)


def cross_validate(
    bags: Sequence[torch.Tensor],
    table: SlideTable,
    config: MILTrainConfig,
    folds: int,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = False,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train and test one model per fold; write models, logs, predictions, metrics and the manifest.

    A folder holding an unfinished run with the same settings and data is resumed: finished
    folds are kept, the current fold continues from the engine's last checkpoint (one per
    epoch); the result is bit-identical to an uninterrupted run. Other settings are refused
    unless ``overwrite``.

    Returns:
        ``{"folds": [per-fold metrics], "pooled": {...}, "mean": {...}, "sd": {...}}``.

    Raises:
        HistofmError: on NaN validation losses, non-finite training or non-finite predictions;
            then no metrics are written and the unfinished run is forgotten.
    """
    out = Path(out_dir)
    survival = table.task == "survival"
    if survival:
        check_loss(config.loss, config.batch_size)
    in_dim = int(getattr(bags, "dim", 0) or bags[0].shape[1])
    out_dim = output_dim(table, config)
    splits = make_folds(table.labels, table.patients, folds, config.seed, None if survival else table.class_names)
    run_config = {
        "aggregator": config.model, "model_kwargs": config.model_kwargs, "in_dim": in_dim, "out_dim": out_dim,
        "task": table.task, "class_names": table.class_names, "folds": folds, "train": asdict(config),
        "provenance": provenance or {}, "data_sha256": data_fingerprint(table, bags),
    }
    run_id, done = begin_run(out, run_config, overwrite=overwrite)
    try:
        return _run_folds(bags, table, config, splits, out, run_id, run_config, done, in_dim, out_dim, device, progress)
    except HistofmError:
        abandon_run(out)  # a deterministic failure (NaN) would only repeat on resume
        raise


def _run_folds(
    bags: Sequence[torch.Tensor], table: SlideTable, config: MILTrainConfig,
    splits: list[tuple[np.ndarray, np.ndarray]], out: Path, run_id: str, run_config: dict[str, Any],
    done: list[dict[str, Any]], in_dim: int, out_dim: int, device: str | torch.device, progress: bool,
) -> dict[str, Any]:
    done_by_fold = {int(d["fold"]): d for d in done
                    if (out / d["file"]).is_file() and sha256(out / d["file"]) == d.get("sha256")}
    log_lines: list[str] = []
    results, fold_docs = [], []
    for k, (tr, te) in enumerate(splits):
        target, edges = fold_targets(table, config, tr)
        fit_idx, val_idx = validation_split(tr, table.labels, table.patients, config.val_fraction, config.seed + k)
        name = f"fold_{k}.safetensors"
        if k in done_by_fold:  # finished before a kill: its logits and log records were kept
            logits = np.asarray(done_by_fold[k]["logits"], dtype=np.float64).reshape(len(te), out_dim)
            fold_log = done_by_fold[k]["log"]
        else:
            seed_everything(config.seed + k)  # the fold's initialisation
            model = build_aggregator(config.model, in_dim, out_dim, **config.model_kwargs)
            records = fit_bags(model, subset(bags, fit_idx), target[fit_idx], config, device, progress,
                               val_bags=subset(bags, val_idx), val_labels=target[val_idx],
                               out_dir=fold_dir(out, k), resume=True, label=f"{config.model} fold {k}")
            fold_log = [{"fold": k, **r} for r in records]
            logits, _ = predict_logits(model, subset(bags, te), device, scores=False)
            if not np.isfinite(logits).all():
                raise HistofmError(
                    f"The fold {k} model of {config.model} gives NaN or infinite outputs on its test slides "
                    f"(e.g. {table.slide_ids[te[int(np.argwhere(~np.isfinite(logits))[0, 0])]]!r}); "
                    f"lower --lr (now {config.lr:g}) or check that slide's features, and train again."
                )
            save_weights(out / name, model.state_dict())
            fold_done(out, {"fold": k, "file": name, "logits": logits.tolist(), "log": fold_log})
        log_lines.extend(json.dumps(r) for r in fold_log)
        with atomic_path(out / "log.jsonl") as tmp:
            tmp.write_text("".join(line + "\n" for line in log_lines))
        results.append(summarise_fold(table, config, k, te, logits, n_train=len(fit_idx), n_val=len(val_idx)))
        fold_docs.append({"fold": k, "file": name, "test_slides": [table.slide_ids[i] for i in te],
                          "bin_edges": None if edges is None else [float(e) for e in edges]})
    summary = write_results(out, table, config, results, out_dim)
    finish_run(out, run_id, run_config, fold_docs)
    return summary
