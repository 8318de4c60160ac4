"""Keeping the best weights by a monitored metric, and stopping early when it stops improving.

The engine calls :meth:`BestWeights.update` after each periodic evaluation with the
metrics it returned. When the monitored metric improves (lower for ``mode="min"``,
higher for ``"max"``; a NaN never improves), a copy of the weights goes to the CPU
and the count of evaluations without improvement restarts; after ``patience`` such
evaluations in a row the run stops (``patience=0``: never). At the end the engine
loads the best weights back. Everything here travels in the training checkpoint
(:meth:`state_dict`), so a resumed run keeps the same best weights and patience count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from histofm.errors import HistofmError


class BestWeights:
    """Best value of ``metric`` so far, the step it came at, the weights then, and the patience count."""

    def __init__(self, metric: str | None, mode: str = "min", patience: int = 0) -> None:
        self.metric, self.mode, self.patience = metric, mode, patience
        self.value: float | None = None
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0
        self.stopped = False

    def better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def update(self, step: int, metrics: dict[str, float], weights: Callable[[], dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Take the metrics of the evaluation after ``step``; returns fields for that step's log record.

        Args:
            step: the global step just taken (0-based).
            metrics: what the evaluation returned; must contain the monitored metric.
            weights: returns the current full state dict (called only on an improvement).
        """
        if self.metric is None:
            return {}
        if self.metric not in metrics:
            have = ", ".join(sorted(metrics)) or "nothing"
            raise HistofmError(
                f"best_metric={self.metric!r} is not among the evaluation's metrics ({have}); set best_metric to one of them."
            )
        value = float(metrics[self.metric])
        if self.better(value):
            self.value, self.step, self.bad_evals = value, step, 0
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in weights().items()}
        else:
            self.bad_evals += 1
        self.stopped = self.patience > 0 and self.bad_evals >= self.patience
        return {"best_step": self.step, f"best_{self.metric}": self.value}

    def state_dict(self) -> dict[str, Any]:
        """Plain data and tensors (readable with ``torch.load(weights_only=True)``)."""
        return {"value": self.value, "step": self.step, "weights": self.weights,
                "bad_evals": self.bad_evals, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.step, self.weights = state["value"], state["step"], state["weights"]
        self.bad_evals, self.stopped = int(state["bad_evals"]), bool(state["stopped"])
