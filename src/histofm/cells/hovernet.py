"""Nucleus instance segmentation in the HoVer-Net formulation, on a ViT + UNETR decoder (CellViT-like).

HoVer-Net (Graham et al. 2019, arXiv 1812.06499) predicts three maps per pixel:

* **NP**, nuclear pixels: foreground versus background (2 logits);
* **HV**, horizontal and vertical distances: for a pixel ``(y, x)`` of nucleus ``k``
  with centre of mass ``(c_y, c_x)``, ``h = x - c_x`` and ``v = y - c_y``, each scaled
  per nucleus and per sign into ``[-1, 1]``::

      h(y, x) = (x - c_x) / max_{k}(x - c_x)       if x >= c_x
              = (x - c_x) / |min_{k}(x - c_x)|     otherwise          (v alike with y)

  so every nucleus is a small "tent" from -1 to 1 in both directions, and two
  touching nuclei meet at a jump from +1 to -1: the gradient of HV marks the
  boundary between instances that the NP map alone merges;
* **TP**, type: background plus ``T`` nucleus classes (``T + 1`` logits).

Loss (the paper's Eq. 1-4, weights ``lambda_msge = 2``, the others 1)::

    L = CE(NP) + Dice(NP) + MSE(HV) + 2 * MSGE(HV) + CE(TP) + Dice(TP)
    MSGE = mean over nuclear pixels of (d_x h_pred - d_x h_true)^2 + (d_y v_pred - d_y v_true)^2

with ``d_x``, ``d_y`` 5x5 Sobel derivatives. Instances come back from the three
maps by :func:`histofm.cells.postprocess.hovernet_instances`.

Differences from CellViT, on purpose: one shared decoder with three 1x1 heads
instead of three decoders (a third of the cost), and LayerNorm-ed block outputs
as skip features (``forward_intermediates(norm=True)``), which keeps the feature
scale of a frozen encoder the same at every depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.models.unetr import UNETRDecoder, default_layer_indices


# ---------------------------------------------------------------------------- targets
def hv_targets(inst: np.ndarray) -> np.ndarray:
    """Horizontal and vertical distance maps ``(2, H, W)`` float32 in ``[-1, 1]`` from an instance mask ``(H, W)``."""
    from scipy import ndimage

    inst = np.asarray(inst)
    out = np.zeros((2,) + inst.shape, dtype=np.float32)
    for k, sl in enumerate(ndimage.find_objects(inst), start=1):
        if sl is None:
            continue
        mask = inst[sl] == k  # (h, w) this nucleus in its bounding box
        ys, xs = np.nonzero(mask)
        for ch, coords in ((0, xs), (1, ys)):
            d = coords - coords.mean()  # distance to the centre of mass along x (h) or y (v)
            neg, pos = d < 0, d > 0
            if neg.any():
                d[neg] /= -d[neg].min()
            if pos.any():
                d[pos] /= d[pos].max()
            out[ch][sl][ys, xs] = d
    return out


def hovernet_targets(inst: np.ndarray, types: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """NP ``(H, W)`` int64 in {0, 1}, HV ``(2, H, W)`` float32, TP ``(H, W)`` int64 (0 background, 1..T)."""
    inst = np.asarray(inst)
    fg = inst > 0
    tp = np.where(fg, np.asarray(types), 0).astype(np.int64) if types is not None else fg.astype(np.int64)
    return {"np": fg.astype(np.int64), "hv": hv_targets(inst), "tp": tp}


# ---------------------------------------------------------------------------- losses
def _sobel_kernels(size: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivative kernels ``(size, size)`` along x and y, scaled so a unit ramp has gradient ~1."""
    r = torch.arange(size, dtype=torch.float32) - size // 2
    smooth = torch.tensor([float(math.comb(size - 1, i)) for i in range(size)])  # binomial smoothing
    kx = smooth[:, None] * r[None, :]  # derivative along x, smoothing along y
    kx = kx / (kx * r[None, :]).sum()  # a ramp x -> x has derivative 1
    return kx, kx.t().contiguous()


def msge_loss(hv_pred: torch.Tensor, hv_true: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Mean squared gradient error of HV maps ``(B, 2, H, W)`` over nuclear pixels ``fg`` ``(B, H, W)``."""
    kx, ky = (k.to(hv_pred) for k in _sobel_kernels(5))
    w = torch.stack([kx, ky])[:, None]  # (2, 1, 5, 5): d/dx for h, d/dy for v

    def grad(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, padding=2, groups=2)

    err = (grad(hv_pred) - grad(hv_true)) ** 2  # (B, 2, H, W)
    m = fg[:, None].to(err.dtype)
    return (err * m).sum() / (2 * m.sum()).clamp_min(1.0)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Soft Dice loss over the classes of ``logits`` ``(B, K, H, W)`` with labels ``(B, H, W)`` (background included)."""
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    inter = (prob * onehot).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


def hovernet_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor], msge_weight: float = 2.0) -> dict[str, torch.Tensor]:
    """The HoVer-Net loss and its terms; ``out`` and ``target`` hold ``np``, ``hv``, ``tp`` (see module docstring)."""
    fg = target["np"]
    terms = {
        "np_ce": F.cross_entropy(out["np"], fg),
        "np_dice": dice_loss(out["np"], fg),
        "hv_mse": F.mse_loss(out["hv"], target["hv"]),
        "hv_msge": msge_loss(out["hv"], target["hv"], fg),
        "tp_ce": F.cross_entropy(out["tp"], target["tp"]),
        "tp_dice": dice_loss(out["tp"], target["tp"]),
    }
    loss = sum(v for k, v in terms.items() if k != "hv_msge") + msge_weight * terms["hv_msge"]
    return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


# ---------------------------------------------------------------------------- model
@dataclass(frozen=True)
class HoVerNetConfig:
    """What a saved cell model needs to be rebuilt.

    Attributes:
        encoder: registered ViT name (``histofm.list_models()``).
        encoder_kwargs: constructor overrides of the encoder (``{"depth": 4}``).
        num_types: nucleus classes ``T`` (the type head has ``T + 1`` outputs).
        type_names: their names, in order 1..T.
        layer_indices: encoder blocks feeding the decoder, shallow to deep; ``None``: spread evenly.
        widths: decoder channels per scale (see :class:`~histofm.models.unetr.UNETRDecoder`).
        freeze_encoder: keep the encoder's weights fixed during training.
        mean, std: input normalisation (of the encoder).
        tile: side of the training crops and the default inference tile.
    """

    encoder: str = "vit_tiny_patch8_224"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    num_types: int = 3
    type_names: tuple[str, ...] = ("connective", "inflammatory", "neoplastic")
    layer_indices: tuple[int, ...] | None = None
    widths: tuple[int, ...] | None = None
    freeze_encoder: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    tile: int = 128

    def __post_init__(self) -> None:
        if len(self.type_names) != self.num_types:
            raise HistofmError(f"type_names has {len(self.type_names)} names for num_types={self.num_types}; give one name per type.")


class HoVerNetViT(nn.Module):
    """ViT encoder + UNETR decoder + HoVer-Net heads: ``forward(x)`` gives ``{"np", "hv", "tp"}`` maps.

    Args:
        encoder: a :class:`~histofm.models.vit.VisionTransformer` (anything with
            ``forward_intermediates``, ``patch_size``, ``embed_dim`` and ``blocks``).
        num_types: nucleus classes ``T``.
        layer_indices: blocks feeding the decoder, shallow to deep (``log2(patch_size)`` of them).
        widths: decoder channels per scale.
        freeze_encoder: no gradient into the encoder, which stays in eval mode.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_types: int = 3,
        layer_indices: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        freeze_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = int(encoder.patch_size)
        self.decoder = UNETRDecoder(encoder.embed_dim, self.patch_size, widths=widths)
        stages = self.decoder.stages
        self.layer_indices = list(layer_indices) if layer_indices is not None else default_layer_indices(
            len(encoder.blocks), stages
        )
        if len(self.layer_indices) != stages:
            raise HistofmError(f"Patch size {self.patch_size} needs {stages} layer indices, got {self.layer_indices}; pass {stages} indices or leave them to the default.")
        c = self.decoder.out_channels
        self.np_head = nn.Conv2d(c, 2, 1)
        self.hv_head = nn.Conv2d(c, 2, 1)
        self.tp_head = nn.Conv2d(c, num_types + 1, 1)
        self.num_types = num_types
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> HoVerNetViT:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps dropout and drop-path off
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images ``(B, 3, H, W)``, sides multiples of the patch size -> NP ``(B, 2, H, W)``, HV ``(B, 2, H, W)``, TP ``(B, T+1, H, W)``."""
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise HistofmError(f"The image sides must be multiples of the patch size {p}, got {tuple(x.shape[-2:])}; pad or crop the tiles.")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            feats = self.encoder.forward_intermediates(
                x, indices=self.layer_indices, norm=True, stop_early=True, intermediates_only=True
            )  # S maps (B, D, H/p, W/p)
        y = self.decoder(x, feats)  # (B, C_0, H, W)
        return {"np": self.np_head(y), "hv": self.hv_head(y), "tp": self.tp_head(y)}


def build_hovernet(cfg: HoVerNetConfig, encoder_checkpoint: str | None = None) -> HoVerNetViT:
    """Build the model of ``cfg``; the encoder from ``histofm.create_model`` (with weights when given)."""
    from histofm.registry import create_model

    encoder = create_model(cfg.encoder, checkpoint_path=encoder_checkpoint, **cfg.encoder_kwargs)
    return HoVerNetViT(encoder, cfg.num_types, cfg.layer_indices, cfg.widths, cfg.freeze_encoder)
