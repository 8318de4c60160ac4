"""The contract between a self-supervised method and the training engine.

A method is an ``nn.Module`` that turns a batch into a dict of losses. It never
moves tensors between devices, scales losses, calls ``backward`` or steps an
optimiser: that is ``histofm.train``'s job. Per-step schedules that belong to
the method (EMA momentum of a teacher, teacher temperature, queue updates) are
applied in :meth:`SSLMethod.on_step_end`, which the engine calls after each
optimiser step with the global step and the total number of steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SSLMethod(nn.Module):
    """Base class of every pretraining method (SimCLR, MoCo, CLIP, DINO, iBOT, DINOv2, MAE ...).

    Subclasses set ``self.backbone`` (the encoder that is saved and evaluated) and
    implement :meth:`forward`, returning a dict with at least ``"loss"`` (a scalar
    to minimise); every other scalar entry is logged as is.
    """

    backbone: nn.Module

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called by the engine after each optimiser step (EMA, schedules). Default: nothing."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (teachers and other EMA copies excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def frozen_on_purpose(self) -> dict[str, str]:
        """Trainable parameters that get no gradient by design: ``{fnmatch pattern of the name: reason}``.

        ``tests/test_method_contract.py`` requires a finite, non-zero gradient for every other
        parameter of :meth:`trainable_parameters`, and that each pattern here still matches a
        parameter without one. Default: none.
        """
        return {}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone embedding ``(B, D)`` used for kNN checks and collapse monitoring."""
        return self.backbone(x)
