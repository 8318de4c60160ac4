"""Semi-supervised training through the one engine.

The methods (:mod:`histofm.learning.fixmatch`, ``meanteacher``, ``pseudolabel``,
:class:`~histofm.learning.semi.Supervised`) only turn a batch into losses; the
batches come from :class:`~histofm.learning.semi.SemiSteps` (``B`` labelled and
``mu * B`` unlabelled images per step, a pure function of the seed and the step);
everything else is the engine's :func:`histofm.train.loop.fit`: optimiser and
schedule, bf16, gradient clipping, DDP, the non-finite guard, ``log.jsonl``,
progress, checkpoints and exact resume. This file wires the three and adds what
only a classifier needs after training: BatchNorm statistics of the plain
training images (:func:`~histofm.learning.semi.recalibrate_batchnorm`) and a
check that the deployed weights are finite::

    from histofm.learning import build_semi_method
    from histofm.learning.semi import Classifier, SemiData, SmallConvNet, evaluate
    from histofm.train.semi import fit_semi, semi_config

    method = build_semi_method("fixmatch", Classifier(SmallConvNet(32), num_classes=3))
    history = fit_semi(method, SemiData(x_l, y_l, x_u), semi_config(steps=1000, out_dir="run/"), mu=4)
    evaluate(method, x_test, y_test)

The defaults of :func:`semi_config` are FixMatch's optimiser: SGD with Nesterov
momentum 0.9, lr 0.03, weight decay 5e-4 on weights only, no gradient clipping,
and FixMatch's schedule ``lr * cos(7 pi k / 16 K)`` (see :data:`SEMI_DEFAULTS`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from histofm.errors import HistofmError
from histofm.learning.semi import SemiData, SemiMethod, SemiSteps, recalibrate_batchnorm
from histofm.train.checkpoint import export_backbone
from histofm.train.config import TrainConfig
from histofm.train.loop import History, fit, resolve_device
from histofm.utils import atomic_path
from histofm.utils import distributed as dist_utils

# The engine's settings that differ from its pretraining defaults: FixMatch's optimiser.
SEMI_DEFAULTS: dict[str, Any] = {
    "steps": 500, "batch_size": 32, "optimizer": "sgd", "nesterov": True, "lr": 0.03, "lr_schedule": "fixmatch",
    "weight_decay": 5e-4, "grad_clip": None, "monitor_every": 0, "ckpt_every": 100, "progress": False,
    "tensorboard": False,
}


def semi_config(**changes: Any) -> TrainConfig:
    """The engine's :class:`~histofm.train.config.TrainConfig` with :data:`SEMI_DEFAULTS`, then ``changes``.

    ``batch_size`` is the number of LABELLED images per step (``B``); ``mu`` is passed to
    :func:`fit_semi`. A misspelt key raises :class:`HistofmError`.
    """
    return TrainConfig().replace(**{**SEMI_DEFAULTS, **changes})


def fit_semi(
    method: SemiMethod,
    data: SemiData,
    cfg: TrainConfig | None = None,
    *,
    mu: int = 4,
    recalibrate_bn: bool = True,
    record: dict[str, Any] | None = None,
    run_info: dict[str, Any] | None = None,
) -> History:
    """Train ``method`` on ``data`` through the engine; returns the engine's per-step history.

    Args:
        method: a semi-supervised method around a classifier.
        data: labelled and unlabelled ``uint8`` images.
        cfg: the engine's configuration (default: :func:`semi_config`); with ``out_dir`` the
            engine writes ``checkpoint.pt``, ``log.jsonl``, ``loss_curve.png`` and ``config.json``
            there (``resume=True`` continues an interrupted run exactly), and this function the
            deployed classifier, after recalibration, as ``model.safetensors`` + ``model.json``.
        mu: unlabelled images per labelled one (``mu * batch_size`` per step); keep it when resuming.
        recalibrate_bn: after training, recompute the deployed model's BatchNorm statistics on the
            un-augmented training images (running statistics follow augmented batches of moving
            weights; evaluated as they are, they made models predict mostly one class).
        record: extra entries of ``model.json`` (how to rebuild the classifier: the CLI's model
            name, classes, image size).
        run_info: settings a resume must keep, keyed by flag (the engine's ``run_info``: another
            value is refused naming the flag), e.g. the image size and the held-out label file.

    Raises:
        HistofmError: the loss stayed non-finite (the engine's guard) or a deployed weight is not
            finite after training.
    """
    cfg = cfg if cfg is not None else semi_config()
    steps = SemiSteps(data, mu)  # checks mu
    if cfg.out_dir is not None:
        _keep_mu(Path(cfg.out_dir), mu, cfg.resume)
    history = fit(method, steps, cfg, label="semi", run_info=run_info)
    device = resolve_device(cfg.device)
    if recalibrate_bn:
        recalibrate_batchnorm(method.deployed(), torch.cat([data.x_l, data.x_u]), device)
    bad = next((k for k, v in method.deployed().state_dict().items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # never hand back (and save) a model with NaN weights
        raise HistofmError(f"The model's weight {bad} is not finite after training; lower the learning rate (--lr).")
    method.eval()
    if cfg.out_dir is not None and dist_utils.rank() == 0:
        finished = len(history) >= cfg.steps
        info = {**method.export_info(), "mu": mu, "steps": len(history), "finished": finished, **(record or {})}
        export_backbone(method.deployed(), Path(cfg.out_dir), info, name="model")
    return history


def _keep_mu(out_dir: Path, mu: int, resume: bool) -> None:
    """Record ``mu`` beside the checkpoint; a resume with another ``mu`` would draw other batches."""
    record = out_dir / "semi.json"
    if resume and record.is_file():
        saved = json.loads(record.read_text()).get("mu")
        if saved != mu:
            raise HistofmError(f"Cannot resume: the checkpoint was made with mu={saved} but this run has mu={mu}; "
                               "use the same --mu or another --out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({"mu": mu}) + "\n")


__all__ = ["SEMI_DEFAULTS", "fit_semi", "semi_config"]
