"""The training-unit contract: what the one engine (:func:`histofm.train.fit`) trains.

An :class:`Objective` is an ``nn.Module`` that turns a batch into a dict of
losses. Self-supervised methods (:class:`histofm.methods.base.SSLMethod`),
semi-supervised objectives and MIL slide objectives all follow it, so they all
run through the same loop: the same resume, precision, clipping, DDP, logging,
progress bar and non-finite guard. An objective never moves tensors between
devices, scales losses, calls ``backward`` or steps an optimiser: that is the
engine's job. It lives on the bottom floor so that every floor that defines an
objective (methods, MIL, semi-supervised learning) can import it without
importing the engine.

The contract, in full:

* ``forward(batch) -> dict``: ``"loss"`` is the scalar to minimise; every other
  scalar entry is logged as is (``aux_*`` entries are terms already added into ``"loss"``).
* :meth:`Objective.trainable_parameters`: what the optimiser updates (EMA teachers excluded).
* :meth:`Objective.on_step_end`: per-step schedules (EMA momentum, temperatures, queues),
  called after each optimiser step with the global step (0-based) and the total steps.
* :meth:`Objective.exported_module`: the module written at the end of a run as
  ``<export_name>.safetensors`` (the backbone for SSL); ``None`` writes nothing;
  :meth:`Objective.export_info` adds facts to ``<export_name>.json``.
* :meth:`Objective.embed` (optional): pooled embeddings ``(B, D)`` for the collapse watch;
  objectives that do not override it are not monitored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Objective(nn.Module):
    """Base class of everything the engine trains (see the module docstring for the contract).

    Attributes:
        export_name: file stem of the exported module (``backbone`` -> ``backbone.safetensors``).
        min_batch_size: the smallest global batch the objective makes sense with (2 for
            self-supervised methods, which compare samples; 1 for MIL, one slide per step).
    """

    export_name: str = "model"
    min_batch_size: int = 1

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called by the engine after each optimiser step (EMA, schedules). Default: nothing."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (teachers and other EMA copies excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def exported_module(self) -> nn.Module | None:
        """The module the engine saves at the end of a run (default: nothing)."""
        return None

    def export_info(self) -> dict[str, Any]:
        """JSON-friendly facts written beside the exported module (``<export_name>.json``). Default: none."""
        return {}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, D)`` of inputs ``x``; override to enable the collapse watch."""
        raise NotImplementedError(f"{type(self).__name__} does not define embed()")


def has_embed(objective: Objective) -> bool:
    """True when ``objective`` overrides :meth:`Objective.embed` (the collapse watch can run)."""
    return type(objective).embed is not Objective.embed
