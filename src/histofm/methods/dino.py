"""DINO: self-distillation with no labels.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
arXiv 2104.14294.

A student network ``g_s`` is trained to match a teacher ``g_t`` that is an
exponential moving average (EMA) of the student. Both map an image to ``K``
logits through a backbone and a :class:`~histofm.layers.heads.DINOHead`. Each
image gives two global crops and ``N`` local crops (multi-crop); the teacher
sees the global crops only, the student sees all. With ``P_t = softmax((g_t(x) -
c) / tau_t)`` and ``P_s = softmax(g_s(x') / tau_s)`` the loss (Eq. 3) is::

    L = mean over pairs (x in globals, x' in all crops, x' != x) of  H(P_t(x), P_s(x'))
    H(a, b) = - sum_k a_k log b_k

Collapse is avoided by two opposite forces on the teacher output: CENTERING
(subtract ``c``, an EMA of the batch mean of teacher logits, ``c <- m c + (1 - m)
mean(g_t)``, ``m = 0.9``, updated after the loss) prevents one dimension from
dominating, and SHARPENING (a low teacher temperature, warmed up linearly from
0.04 to 0.07) prevents the uniform output. The teacher's EMA momentum follows a
cosine from 0.996 to 1. The teacher is what DINO evaluates, so this method's
``backbone`` (what the engine saves and monitors) is the teacher's.

The loss is :class:`~histofm.methods.losses.DINOLoss`, the head
:class:`~histofm.layers.heads.DINOHead`; the settings, the student/teacher pair and the
views come from :mod:`histofm.methods.distillation` (plumbing shared with iBOT and DINOv2).

The batch is a list of crop tensors ``[global_1, global_2, local_1, ...]``,
each ``(B, 3, S, S)``, as produced by :class:`~histofm.data.multicrop.MultiCropTransform`
and ``default_collate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from histofm.layers.heads import prototypes_frozen
from histofm.methods.base import SSLMethod, split_crops
from histofm.methods.distillation import (
    DistillationConfig,
    build_student_teacher,
    make_config,
    multicrop_transform,
)
from histofm.methods.losses import DINOLoss, teacher_temperature
from histofm.utils.ema import ema_update
from histofm.utils.schedules import momentum_schedule


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DINOConfig(DistillationConfig):
    """DINO defaults of the paper's ViT-S/16 run (main_dino.py): those of
    :class:`~histofm.methods.distillation.DistillationConfig`, where every field is described."""



# --------------------------------------------------------------------------- method
class DINO(SSLMethod):
    """Student/teacher self-distillation on multi-crop views (see the module docstring).

    Args:
        arch: backbone name for :func:`histofm.create_model` (a ViT).
        cfg: the configuration.
        img_size: global crop size (the backbone's native size).
    """

    step: torch.Tensor
    max_steps: torch.Tensor

    def __init__(self, arch: str, cfg: DINOConfig, img_size: int = 224) -> None:
        super().__init__()
        self.cfg = cfg
        kwargs = {"img_size": img_size, "drop_path_rate": cfg.drop_path_rate, **cfg.backbone_kwargs}
        self.student, self.teacher = build_student_teacher("DINO", arch, cfg, kwargs)  # backbone + head each
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_steps", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        """The teacher backbone (what DINO evaluates), or the student's with ``eval_teacher=False``."""
        return self.teacher["backbone"] if self.cfg.eval_teacher else self.student["backbone"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop path in the teacher
        return self

    # -------------------------------------------------------------- schedules
    def teacher_temp(self) -> float:
        """``tau_t`` at the current step (linear warm-up, then constant)."""
        c = self.cfg
        return teacher_temperature(
            int(self.step), int(self.max_steps), c.warmup_teacher_temp, c.teacher_temp, c.teacher_temp_warmup
        )

    def last_layer_frozen(self) -> bool:
        return prototypes_frozen(int(self.step), int(self.max_steps), self.cfg.freeze_last_layer)

    def momentum(self, step: int, max_steps: int) -> float:
        """EMA momentum of the teacher: a half cosine from ``momentum_teacher`` to ``momentum_teacher_final``."""
        return momentum_schedule(step, max_steps, self.cfg.momentum_teacher, self.cfg.momentum_teacher_final)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA update of the teacher; remembers the step for the temperature schedule."""
        ema_update(self.teacher, self.student, self.momentum(step, max_steps))
        self.step.fill_(step + 1)
        self.max_steps.fill_(max_steps)

    # -------------------------------------------------------------- forward
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        globals_, locals_, _ = split_crops(batch, self.cfg.n_global_crops)
        G, B = len(globals_), globals_[0].shape[0]
        n_views = G + len(locals_)
        g = torch.cat(globals_)  # (G*B, 3, S, S)
        temp = self.teacher_temp()
        with torch.no_grad():  # the teacher sees the global crops only
            t_logits = self.teacher["head"](self.teacher["backbone"].forward_features(g)[:, 0])  # (G*B, K)
        student_bb = self.student["backbone"]
        cls = [student_bb.forward_features(g)[:, 0]]  # class tokens after the final norm, (G*B, D)
        if locals_:
            cls.append(student_bb.forward_features(torch.cat(locals_))[:, 0])  # (L*B, D)
        s_logits = self.student["head"](torch.cat(cls), freeze_last_layer=self.last_layer_frozen())  # (V*B, K)
        loss = self.dino_loss(s_logits.view(n_views, B, -1), t_logits.view(G, B, -1), temp)
        return {"loss": loss, "dino_loss": loss.detach(), "teacher_temp": torch.tensor(temp)}


def build(name: str, arch: str, *, img_size: int, overrides: dict[str, Any]) -> tuple[DINO, Callable[[Any], Any]]:
    """``histofm pretrain --method dino``: the method and its multi-crop transform."""
    cfg = make_config(DINOConfig, overrides)
    method = DINO(arch, cfg, img_size=img_size)
    return method, multicrop_transform(cfg, img_size, method.student["backbone"].patch_size)
