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

The two terms are :class:`~histofm.methods.losses.DINOLoss` and
:class:`~histofm.methods.losses.IBOTPatchLoss` (each with its own running-mean center;
the patch center follows the masked patches' teacher logits, as DINOv2 and lightly do),
the head :class:`~histofm.layers.heads.DINOHead`; settings, the student/teacher pair and
the views come from :mod:`histofm.methods.distillation`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from histofm.layers.heads import class_and_patch_logits, prototypes_frozen
from histofm.methods.base import SSLMethod, split_crops
from histofm.methods.distillation import (
    MaskedDistillationConfig,
    build_student_teacher,
    make_config,
    multicrop_transform,
)
from histofm.methods.losses import DINOLoss, IBOTPatchLoss, teacher_temperature
from histofm.methods.masking import BlockMaskCollator
from histofm.settings import setting
from histofm.utils.ema import ema_update
from histofm.utils.schedules import momentum_schedule


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class IBOTConfig(MaskedDistillationConfig):
    """iBOT defaults (ViT-S/16 style); every field is described in
    :class:`~histofm.methods.distillation.MaskedDistillationConfig` and its parent."""

    out_dim: int = setting(8192, range=">= 1")
    n_local_crops: int = setting(10, range=">= 0")
    global_scale: tuple[float, float] = setting((0.32, 1.0), range="(0, 1]", ordered=True)
    local_scale: tuple[float, float] = setting((0.05, 0.32), range="(0, 1]", ordered=True)



# --------------------------------------------------------------------------- method
class IBOT(SSLMethod):
    """DINO's class-token loss plus masked patch-token distillation (see the module docstring).

    Args:
        arch: backbone name for :func:`histofm.create_model` (a ViT; built with a mask token).
        cfg: the configuration.
        img_size: global crop size (the backbone's native size).
    """

    step: torch.Tensor
    max_steps: torch.Tensor

    def __init__(self, arch: str, cfg: IBOTConfig, img_size: int = 224) -> None:
        super().__init__()
        self.cfg = cfg
        kwargs = {"img_size": img_size, "drop_path_rate": cfg.drop_path_rate, **cfg.backbone_kwargs,
                  "use_mask_token": True}
        patch_head = None if cfg.shared_head else cfg.patch_out_dim
        self.student, self.teacher = build_student_teacher("IBOT", arch, cfg, kwargs, patch_out_dim=patch_head)
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        patch_dim = cfg.out_dim if cfg.shared_head else cfg.patch_out_dim
        self.ibot_loss = IBOTPatchLoss(patch_dim, cfg.student_temp, cfg.center_momentum)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_steps", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        """The teacher backbone (what iBOT evaluates), or the student's with ``eval_teacher=False``."""
        return self.teacher["backbone"] if self.cfg.eval_teacher else self.student["backbone"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> IBOT:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop path in the teacher
        return self

    # -------------------------------------------------------------- schedules
    def teacher_temp(self) -> float:
        """``tau_t`` at the current step (linear warm-up, then constant), for both losses."""
        c = self.cfg
        return teacher_temperature(
            int(self.step), int(self.max_steps), c.warmup_teacher_temp, c.teacher_temp, c.teacher_temp_warmup
        )

    def last_layer_frozen(self) -> bool:
        return prototypes_frozen(int(self.step), int(self.max_steps), self.cfg.freeze_last_layer)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA update of the teacher (cosine momentum); remembers the step for the temperature schedule."""
        momentum = momentum_schedule(step, max_steps, self.cfg.momentum_teacher, self.cfg.momentum_teacher_final)
        ema_update(self.teacher, self.student, momentum)
        self.step.fill_(step + 1)
        self.max_steps.fill_(max_steps)

    # -------------------------------------------------------------- forward
    def make_masks(self, n: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Block masks ``(n, gh, gw)`` for ``n`` global crops (DINOv2's stratified rule)."""
        c = self.cfg
        return BlockMaskCollator(grid, c.mask_probability, c.mask_ratio, min_aspect=c.mask_min_aspect)(n).to(device)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        globals_, locals_, masks = split_crops(batch, self.cfg.n_global_crops)
        G, B = len(globals_), globals_[0].shape[0]
        n_views = G + len(locals_)
        g = torch.cat(globals_)  # (G*B, 3, S, S)
        s_bb, t_bb = self.student["backbone"], self.teacher["backbone"]
        if masks is None:
            masks = self.make_masks(g.shape[0], (g.shape[-2] // s_bb.patch_size, g.shape[-1] // s_bb.patch_size), g.device)
        flat = masks.reshape(g.shape[0], -1).to(device=g.device, dtype=torch.bool)  # (G*B, N)
        P = s_bb.num_prefix_tokens
        with torch.no_grad():  # the teacher sees the global crops, unmasked: the "online tokenizer"
            t_tok = t_bb.forward_features(g)  # (G*B, P+N, D)
            t_cls, t_patch = class_and_patch_logits(self.teacher, t_tok[:, 0], t_tok[:, P:][flat])  # (G*B, K), (M, K')
        s_tok = s_bb.forward_features(g, flat)  # (G*B, P+N, D), masked patches replaced by the mask token
        cls = [s_tok[:, 0]]
        if locals_:
            cls.append(s_bb.forward_features(torch.cat(locals_))[:, 0])  # (L*B, D)
        s_cls, s_patch = class_and_patch_logits(self.student, torch.cat(cls), s_tok[:, P:][flat], self.last_layer_frozen())

        temp = self.teacher_temp()
        cls_loss = self.dino_loss(s_cls.view(n_views, B, -1), t_cls.view(G, B, -1), temp)
        patch_loss = self.ibot_loss(s_patch, t_patch, masks, temp)
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
