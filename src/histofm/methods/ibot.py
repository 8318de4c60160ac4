"""iBOT: masked image modelling with an online tokenizer (the recipe of Phikon).

Zhou et al. 2021, "iBOT: Image BERT Pre-Training with Online Tokenizer",
arXiv 2111.07832.

iBOT adds a patch-level term to DINO. Some of the student's global crops have
blocks of patches replaced by a learned ``mask_token``; the teacher sees the
same crops unmasked and acts as an "online tokenizer": for each masked patch
``i`` of a view ``u`` the student must predict the teacher's distribution over
``K`` patch prototypes (Eq. 2)::

    L_MIM = - mean over views u, images b of
            (1 / |M_b|) sum_{i in M_b} P_t^patch(u_i)^T log P_s^patch(u^_i)

with its own center and temperatures (teacher 0.04 -> 0.07, student 0.1). The
class-token term is DINO's (pairs of different views) and the total is
``L = L_[CLS] + L_MIM``. Following the paper, the class and patch heads are
shared by default. Masks are blocks (BEiT), drawn with
:class:`~histofm.methods.masking.BlockMaskCollator`: each global crop is masked
with probability 0.5 and a ratio in [0.1, 0.5].

The patch center is updated with the teacher logits of the masked patches (as
DINOv2 and lightly do; iBOT's own code averages all teacher patch tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from histofm.methods.dino import (
    DINO,
    CenteredTeacher,
    DINOConfig,
    make_config,
    multicrop_transform,
    split_crops,
)
from histofm.methods.masking import BlockMaskCollator
from histofm.settings import setting


# ----------------------------------------------------------------------------- loss
def ibot_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Masked-patch cross-entropy, averaged over masked patches per image, then over ALL images.

    Args:
        student_logits: ``(M, K)`` student logits of the masked patches (image-major order).
        teacher_probs: ``(M, K)`` teacher targets of the same patches.
        masks: ``(B, gh, gw)`` or ``(B, N)`` bool masks; ``M = masks.sum()``. Images without
            a mask count in ``B`` (they contribute 0).
        student_temp: ``tau_s``.
    """
    m = masks.reshape(masks.shape[0], -1)  # (B, N)
    with torch.autocast(student_logits.device.type, enabled=False):
        z = student_logits.float() / student_temp  # (M, K)
        q = teacher_probs.float()
        ce = torch.logsumexp(z, dim=-1) * q.sum(dim=-1) - (q * z).sum(dim=-1)  # (M,)
        weight = (1.0 / m.sum(dim=1).clamp(min=1).float()).unsqueeze(1).expand_as(m)[m]  # (M,)
        return (ce * weight).sum() / m.shape[0]


class IBOTPatchLoss(CenteredTeacher):
    """Centred teacher targets for masked patches and :func:`ibot_cross_entropy`.

    Args: those of :class:`~histofm.methods.dino.CenteredTeacher` (``out_dim``: number of patch prototypes).
    """

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, masks: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """Loss on masked patches ``(M, K)`` given masks ``(B, gh, gw)``; updates the center."""
        t = teacher_logits.detach()
        loss = ibot_cross_entropy(student_logits, self.teacher_probs(t, teacher_temp), masks, self.student_temp)
        self.update_center(t)
        return loss


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class IBOTConfig(DINOConfig):
    """iBOT defaults (ViT-S/16 style). Fields beyond :class:`~histofm.methods.dino.DINOConfig`:

    Attributes:
        patch_out_dim: patch prototypes (equal to ``out_dim`` when the head is shared).
        shared_head: one head for class and patch tokens (the paper's choice).
        patch_loss_weight: weight of ``L_MIM`` (``lambda_2``).
        mask_probability, mask_ratio: fraction of global crops masked and their ratio range.
        mask_min_aspect: aspect range of the mask blocks.
    """

    out_dim: int = setting(8192, range=">= 1")
    patch_out_dim: int = setting(8192, range=">= 1")
    n_local_crops: int = setting(10, range=">= 0")
    global_scale: tuple[float, float] = setting((0.32, 1.0), range="(0, 1]", ordered=True)
    local_scale: tuple[float, float] = setting((0.05, 0.32), range="(0, 1]", ordered=True)
    shared_head: bool = True
    patch_loss_weight: float = setting(1.0, range=">= 0")
    mask_probability: float = setting(0.5, range="[0, 1]")
    mask_ratio: tuple[float, float] = setting((0.1, 0.5), range="[0, 1)", ordered=True)
    mask_min_aspect: float = setting(0.3, range="(0, 1]")


# --------------------------------------------------------------------------- method
class IBOT(DINO):
    """DINO plus masked patch-token distillation (see the module docstring)."""

    cfg: IBOTConfig

    def __init__(self, arch: str, cfg: IBOTConfig, img_size: int = 224) -> None:
        super().__init__(arch, cfg, img_size=img_size, use_mask_token=True)
        patch_dim = cfg.out_dim if cfg.shared_head else cfg.patch_out_dim
        self.ibot_loss = IBOTPatchLoss(patch_dim, cfg.student_temp, cfg.center_momentum)
        self._collators: dict[tuple[int, int], BlockMaskCollator] = {}

    def _add_heads(self, branch: nn.ModuleDict, in_dim: int) -> None:
        if not self.cfg.shared_head:
            c = self.cfg
            from histofm.layers.heads import DINOHead

            branch["patch_head"] = DINOHead(
                in_dim, c.patch_out_dim, c.hidden_dim, c.bottleneck_dim, c.head_layers, c.norm_last_layer,
                c.head_batch_norm,
            )

    def make_masks(self, n: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Block masks ``(n, gh, gw)`` for ``n`` global crops (DINOv2's stratified rule)."""
        if grid not in self._collators:
            c = self.cfg
            self._collators[grid] = BlockMaskCollator(
                grid, c.mask_probability, c.mask_ratio, min_aspect=c.mask_min_aspect
            )
        return self._collators[grid](n).to(device)

    def heads(
        self, branch: nn.ModuleDict, cls: torch.Tensor, patches: torch.Tensor, freeze: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``(C, K)`` and patch logits ``(M, K')``; ONE head call when the head is shared."""
        if "patch_head" in branch:
            return branch["head"](cls, freeze), branch["patch_head"](patches, freeze)
        out = branch["head"](torch.cat([cls, patches]), freeze)
        return out[: cls.shape[0]], out[cls.shape[0] :]

    def encode(
        self, batch: Any, masks: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, int, int]:
        """Teacher and student outputs of a multi-crop batch.

        Returns ``(teacher, student, masks, n_views, B)`` where both dicts hold ``cls_logits``
        (views x B rows, global crops first), ``patch_logits`` (masked patches) and, for the
        student, ``cls_tokens`` of the global crops (backbone output, before the head).
        """
        globals_, locals_, given = split_crops(batch, self.cfg.n_global_crops)
        masks = given if masks is None else masks
        g = torch.cat(globals_)  # (G*B, 3, S, S)
        B, n_views = globals_[0].shape[0], len(globals_) + len(locals_)
        s_bb, t_bb = self.student["backbone"], self.teacher["backbone"]
        grid = (g.shape[-2] // s_bb.patch_size, g.shape[-1] // s_bb.patch_size)
        if masks is None:
            masks = self.make_masks(g.shape[0], grid, g.device)
        flat = masks.reshape(g.shape[0], -1).to(device=g.device, dtype=torch.bool)  # (G*B, N)
        P = s_bb.num_prefix_tokens
        with torch.no_grad():
            t_tok = t_bb.forward_features(g)  # (G*B, P+N, D), unmasked
            t_cls, t_patch = self.heads(self.teacher, t_tok[:, 0], t_tok[:, P:][flat])
        s_tok = s_bb.forward_features(g, flat)  # (G*B, P+N, D), masked patches replaced
        cls = [s_tok[:, 0]]
        if locals_:
            cls.append(s_bb.forward_features(torch.cat(locals_))[:, 0])  # (L*B, D)
        s_cls, s_patch = self.heads(self.student, torch.cat(cls), s_tok[:, P:][flat], self.last_layer_frozen())
        teacher = {"cls_logits": t_cls, "patch_logits": t_patch}
        student = {"cls_logits": s_cls, "patch_logits": s_patch, "cls_tokens": s_tok[:, 0]}
        return teacher, student, masks, n_views, B

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        teacher, student, masks, n_views, B = self.encode(batch)
        G, temp = self.cfg.n_global_crops, self.teacher_temp()
        cls_loss = self.dino_loss(
            student["cls_logits"].view(n_views, B, -1), teacher["cls_logits"].view(G, B, -1), temp
        )
        patch_loss = self.ibot_loss(student["patch_logits"], teacher["patch_logits"], masks, temp)
        loss = cls_loss + self.cfg.patch_loss_weight * patch_loss
        return {
            "loss": loss, "dino_loss": cls_loss.detach(), "ibot_loss": patch_loss.detach(),
            "teacher_temp": torch.tensor(temp), "mask_ratio": masks.float().mean().detach(),
        }


def build(name: str, arch: str, *, img_size: int, overrides: dict[str, Any]) -> tuple[IBOT, Callable[[Any], Any]]:
    """``histofm pretrain --method ibot``: the method and its multi-crop transform."""
    cfg = make_config(IBOTConfig, overrides)
    method = IBOT(arch, cfg, img_size=img_size)
    return method, multicrop_transform(cfg, img_size, method.student["backbone"].patch_size)

