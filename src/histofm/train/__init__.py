"""The training engine: the one place that touches device, precision, backward, optimiser and checkpoints.

>>> from histofm.train import TrainConfig, fit
>>> history = fit(method, dataset, TrainConfig(steps=100, batch_size=64, out_dir="runs/x"), transform=views)

``fit`` trains any :class:`~histofm.utils.objective.Objective`: SSL methods, semi-supervised
and MIL objectives. See :mod:`histofm.train.loop` for the step, evaluation, early stopping and
the conventions objectives follow.
"""

from histofm.train.checkpoint import load_backbone
from histofm.train.config import TrainConfig
from histofm.train.logs import read_log
from histofm.train.loop import History, fit
from histofm.train.monitor import collapse_stats, embedding_std, rankme
from histofm.train.optim import build_optimizer, param_groups
from histofm.utils.ema import ema_update, make_teacher
from histofm.utils.objective import Objective
from histofm.utils.schedules import cosine_schedule, linear_warmup_constant, momentum_schedule

__all__ = [
    "History",
    "Objective",
    "TrainConfig",
    "build_optimizer",
    "collapse_stats",
    "cosine_schedule",
    "ema_update",
    "embedding_std",
    "fit",
    "linear_warmup_constant",
    "load_backbone",
    "make_teacher",
    "momentum_schedule",
    "param_groups",
    "rankme",
    "read_log",
]
