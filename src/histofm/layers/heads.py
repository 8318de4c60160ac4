"""Projection heads: the DINO head (DINO, iBOT, DINOv2, PLUTO) and the MLP head of SimCLR and MoCo.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv 2104.14294, Sec. 3.1: "The projection head consists of a 3-layer
multi-layer perceptron (MLP) with hidden dimension 2048 followed by l2
normalization and a weight normalized fully connected layer with K dimensions"::

    z = MLP(x)                       # (B, bottleneck)
    z = z / ||z||_2                  # onto the unit sphere
    logits = (g / ||v||) v z,  g = 1 fixed ("norm_last_layer")  # (B, K)

With ``g`` fixed to 1 every row of the last layer is a unit vector, so the
logits are cosine similarities between the bottleneck feature and ``K``
learned prototypes; the temperatures of the loss then set their sharpness.
:func:`class_and_patch_logits` applies a shared or a separate head to class and patch
tokens (iBOT shares one head, DINOv2 separates them).

:class:`ProjectionHead` is the plain MLP (Linear, BatchNorm, ReLU) of SimCLR (Chen et al.
2020, arXiv 2002.05709) and MoCo v2/v3 (arXiv 2003.04297, 2104.02057).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from histofm.errors import HistofmError


class DINOHead(nn.Module):
    """MLP -> L2 norm -> weight-normalised linear layer to ``out_dim`` prototypes.

    Args:
        in_dim: size of the backbone feature (class or patch token).
        out_dim: number of prototypes ``K`` (65536 in DINO, 131072 in DINOv2's large runs).
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: size of the L2-normalised bottleneck.
        nlayers: number of MLP layers (>= 1); DINO uses 3.
        norm_last_layer: keep the weight-norm gain ``g`` fixed at 1 (prototypes on the
            unit sphere). DINO notes that freeing it can help but is less stable.
        batch_norm: batch normalisation (batch statistics only, in training and
            evaluation alike) after each hidden linear layer, as DINO's ResNet heads do.
            It magnifies the differences between the images of a batch, so teacher
            targets are informative from the first steps (useful for short runs).

    Parameter names: ``mlp.{0,2,4}`` for the MLP linears (without batch norm) and
    ``last_layer.parametrizations.weight.original{0,1}`` for ``g`` and ``v``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise HistofmError(f"nlayers must be >= 1, got {nlayers}; give the head at least one layer.")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(dims[i + 1], track_running_stats=False))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        gain = self.last_layer.parametrizations.weight.original0  # (K, 1): g
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        """Logits over the prototypes, ``(..., in_dim) -> (..., out_dim)``.

        ``freeze_last_layer`` stops the gradient into the prototypes (DINO freezes
        them during the first epoch, which stabilises the start of training).
        """
        lead = x.shape[:-1]
        z = self.mlp(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)  # (..., bottleneck)
        z = F.normalize(z, dim=-1, eps=1e-6)  # on the unit sphere
        weight = self.last_layer.weight  # (K, bottleneck), rows of norm g
        if freeze_last_layer:
            weight = _ZeroGrad.apply(weight)
        return F.linear(z, weight)


def prototypes_frozen(step: int, max_steps: int, fraction: float) -> bool:
    """Whether the prototypes stay frozen at ``step``: the first ``ceil(fraction * max_steps)`` steps.

    ``max_steps`` is 0 until the engine's first ``on_step_end`` tells the method the run's length;
    before that (step 0) any ``fraction > 0`` freezes, as the whole first share of the run must.
    While frozen the prototypes get a zero gradient; unlike the original DINO (which drops the
    gradient), AdamW's weight decay still applies to them.
    """
    if max_steps <= 0:
        return fraction > 0
    return step < math.ceil(fraction * max_steps)


class _ZeroGrad(torch.autograd.Function):
    """Identity whose gradient is zero: the prototypes stay put, yet DistributedDataParallel
    still sees their parameters used (a ``detach`` would leave them out of the graph)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


def class_and_patch_logits(
    branch: nn.ModuleDict, cls: torch.Tensor, patches: torch.Tensor, freeze_last_layer: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits ``(C, K)`` and patch logits ``(M, K')`` of a student or teacher ``branch`` (iBOT, DINOv2).

    ``branch["head"]`` maps class tokens ``(C, D)``; ``branch["patch_head"]``, when present, maps
    patch tokens ``(M, D)``. Without one the head is shared (iBOT's default) and runs ONCE on the
    concatenated rows (batch-norm statistics then cover both kinds of token).
    """
    if "patch_head" in branch:
        return branch["head"](cls, freeze_last_layer), branch["patch_head"](patches, freeze_last_layer)
    out = branch["head"](torch.cat([cls, patches]), freeze_last_layer)  # (C + M, K)
    return out[: cls.shape[0]], out[cls.shape[0] :]


class ProjectionHead(nn.Module):
    """MLP ``in -> hidden -> ... -> out`` with optional BatchNorm and ReLU between layers.

    Args:
        in_dim, hidden_dim, out_dim: widths.
        num_layers: number of Linear layers (>= 1).
        batch_norm: BatchNorm1d after every hidden Linear.
        last_bn: BatchNorm1d after the last Linear too; ``last_bn_affine=False`` as in MoCo v3.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
        last_bn_affine: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise HistofmError(f"num_layers must be at least 1, got {num_layers}; give the head at least one layer.")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not (batch_norm and (not last or last_bn))))
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
            elif last_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_bn_affine))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
