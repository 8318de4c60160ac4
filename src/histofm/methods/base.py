"""The contract between a self-supervised method and the training engine.

A method is an :class:`~histofm.utils.objective.Objective` (the engine's
training-unit contract) whose ``backbone`` is what pretraining produces. It
never moves tensors between devices, scales losses, calls ``backward`` or steps
an optimiser: that is ``histofm.train``'s job. Per-step schedules that belong to
the method (EMA momentum of a teacher, teacher temperature, queue updates) are
applied in :meth:`SSLMethod.on_step_end`, which the engine calls after each
optimiser step with the global step and the total number of steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.utils.objective import Objective


class SSLMethod(Objective):
    """Base class of every pretraining method (SimCLR, MoCo, CLIP, DINO, iBOT, DINOv2, MAE ...).

    Subclasses set ``self.backbone`` (the encoder that is saved and evaluated) and
    implement :meth:`forward`, returning a dict with at least ``"loss"`` (a scalar
    to minimise); every other scalar entry is logged as is. The engine exports the
    backbone as ``backbone.safetensors`` + ``backbone.json`` at the end of a run.
    """

    backbone: nn.Module
    export_name = "backbone"
    min_batch_size = 2  # views of one sample are compared with the other samples of the batch

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401  # pragma: no cover - abstract
        raise NotImplementedError

    def exported_module(self) -> nn.Module:
        """The backbone (what pretraining is for)."""
        return self.backbone

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


def split_crops(batch: Any, n_global: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:  # noqa: ANN401
    """``(global crops, local crops, precomputed masks or None)`` of a batch.

    A batch is a list of crop tensors (global crops first), ``(crops, labels)`` from a labelled
    dataset, or ``{"crops": [...], "masks": (n_global * B, gh, gw)}`` (the multi-crop transform and
    :class:`~histofm.methods.masking.BlockMaskCollator` make them); used by every DINO-family method.
    """
    masks = None
    if isinstance(batch, dict):
        batch, masks = batch["crops"], batch.get("masks")
    elif isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], (list, tuple)):
        batch = batch[0]  # (crops, labels)
    if not isinstance(batch, (list, tuple)) or not all(isinstance(c, torch.Tensor) for c in batch):
        raise HistofmError("A DINO-family batch must be a list of crop tensors (use the method's multi-crop transform).")
    if len(batch) < n_global:
        raise HistofmError(f"The batch has {len(batch)} crops but the method expects {n_global} global crops first.")
    return list(batch[:n_global]), list(batch[n_global:]), masks
