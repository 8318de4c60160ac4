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

The batch is a list of crop tensors ``[global_1, global_2, local_1, ...]``,
each ``(B, 3, S, S)``, as produced by :class:`~histofm.data.multicrop.MultiCropTransform`
and ``default_collate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from histofm.data.multicrop import MultiCropConfig, MultiCropTransform, scaled_multicrop_sizes
from histofm.errors import HistofmError
from histofm.layers.heads import DINOHead
from histofm.methods.base import SSLMethod
from histofm.settings import check_config, config_replace, setting, split_backbone_overrides
from histofm.utils.distributed import all_reduce_mean
from histofm.utils.ema import ema_update, make_teacher
from histofm.utils.schedules import linear_warmup_constant, momentum_schedule


# ----------------------------------------------------------------------------- loss
def cross_entropy_terms(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Matrix of mean cross-entropies ``H(P_t[i], P_s[j])`` over the batch, ``(T, S)``.

    Args:
        student_logits: ``(S, B, K)`` raw student logits of ``S`` views.
        teacher_probs: ``(T, B, K)`` teacher target distributions of ``T`` views.
        student_temp: ``tau_s``.

    Uses ``H(q, softmax(z)) = sum_k q_k * logsumexp(z) - q . z`` so the student's
    log-softmax over ``K`` is never materialised (one matmul instead). Computed in float32.
    """
    with torch.autocast(student_logits.device.type, enabled=False):
        z = student_logits.float() / student_temp  # (S, B, K)
        q = teacher_probs.float()  # (T, B, K)
        lse = torch.logsumexp(z, dim=-1)  # (S, B)
        dots = torch.einsum("tbk,sbk->ts", q, z)  # (T, S): sum over batch and prototypes
        mass = torch.einsum("tb,sb->ts", q.sum(dim=-1), lse)  # (T, S); q sums to 1 per row
        return (mass - dots) / z.shape[1]


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """DINO's loss: mean of :func:`cross_entropy_terms` over pairs of DIFFERENT views.

    View ``i`` of the teacher and view ``i`` of the student are the same crop (the
    global crops come first in both lists), so the diagonal is skipped.
    """
    terms = cross_entropy_terms(student_logits, teacher_probs, student_temp)  # (T, S)
    n_t, n_s = terms.shape
    same = torch.eye(n_t, n_s, dtype=torch.bool, device=terms.device)
    n_terms = n_t * n_s - min(n_t, n_s)
    if n_terms == 0:
        raise HistofmError("DINO's loss needs at least two crops per image; add global or local crops.")
    return terms.masked_fill(same, 0.0).sum() / n_terms


def _stack(views: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return views if isinstance(views, torch.Tensor) else torch.stack(list(views))


class CenteredTeacher(nn.Module):
    """Teacher targets ``softmax((t - c) / tau_t)`` with a center ``c`` kept as an EMA of the teacher's outputs.

    ``c <- m c + (1 - m) mean(t)``, the mean taken over every row on every rank. Shared by
    DINO's class-token loss and iBOT's patch loss.

    Args:
        out_dim: number of prototypes ``K``.
        student_temp: ``tau_s`` (0.1).
        center_momentum: EMA momentum ``m`` of the center (0.9).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``softmax((t - c) / tau_t)`` over the last dimension (float32)."""
        with torch.autocast(teacher_logits.device.type, enabled=False):
            return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(t)`` over every row of ``teacher_logits`` (all ranks); no rows: no change."""
        rows = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
        if rows.shape[0] == 0:
            return  # e.g. nothing was masked in this batch
        batch_center = all_reduce_mean(rows.mean(dim=0))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class DINOLoss(CenteredTeacher):
    """Centred, sharpened teacher targets and the multi-view cross-entropy (Eq. 3 of DINO).

    Args: those of :class:`CenteredTeacher`.
    """

    def forward(
        self,
        student_logits: torch.Tensor | Sequence[torch.Tensor],
        teacher_logits: torch.Tensor | Sequence[torch.Tensor],
        teacher_temp: float,
    ) -> torch.Tensor:
        """Loss over views; updates the center afterwards.

        Args:
            student_logits: ``S`` views of ``(B, K)`` (or a ``(S, B, K)`` tensor), global crops first.
            teacher_logits: ``T`` global views of ``(B, K)`` (or ``(T, B, K)``).
            teacher_temp: ``tau_t`` for this step.
        """
        s, t = _stack(student_logits), _stack(teacher_logits).detach()
        loss = dino_cross_entropy(s, self.teacher_probs(t, teacher_temp), self.student_temp)
        self.update_center(t)
        return loss


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DINOConfig:
    """DINO defaults of the paper's ViT-S/16 run (main_dino.py).

    Schedules are expressed as fractions of the run (``max_steps``) so they work for any length.

    Attributes:
        out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer, head_batch_norm: the DINO head.
        student_temp: ``tau_s``.
        teacher_temp, warmup_teacher_temp, teacher_temp_warmup: ``tau_t`` ramps linearly from
            ``warmup_teacher_temp`` to ``teacher_temp`` over this fraction of the run.
        center_momentum: EMA momentum of the center.
        momentum_teacher, momentum_teacher_final: cosine EMA schedule of the teacher.
        freeze_last_layer: fraction of the run during which the prototypes get no gradient.
        drop_path_rate: stochastic depth of the student backbone.
        n_global_crops, n_local_crops, global_scale, local_scale: multi-crop (sizes follow ``img_size``).
        local_size: local crop side; 0 scales 98 px (at 224) to ``img_size`` (multiple of the patch).
        eval_teacher: ``backbone`` (saved and monitored) is the teacher; False: the student.
        backbone_kwargs: extra ``create_model`` arguments for the backbone.
        crop: ``"rrc"`` or ``"ect"``; ``vflip``: vertical flips (always on with ECT).
        augment: other :class:`~histofm.data.multicrop.MultiCropConfig` fields (colour jitter,
            blur, solarisation, HED jitter, rotations), for example ``{"solarize_p": 0.0, "hed_p": 0.5}``.
    """

    out_dim: int = setting(65536, range=">= 1")
    hidden_dim: int = setting(2048, range=">= 1")
    bottleneck_dim: int = setting(256, range=">= 1")
    head_layers: int = setting(3, range=">= 1")
    norm_last_layer: bool = True
    head_batch_norm: bool = False
    student_temp: float = setting(0.1, range="> 0")
    teacher_temp: float = setting(0.07, range="> 0")
    warmup_teacher_temp: float = setting(0.04, range="> 0")
    teacher_temp_warmup: float = setting(0.3, range="[0, 1]")
    center_momentum: float = setting(0.9, range="[0, 1]")
    momentum_teacher: float = setting(0.996, range="[0, 1]")
    momentum_teacher_final: float = setting(1.0, range="[0, 1]")
    freeze_last_layer: float = setting(0.01, range="[0, 1]")
    drop_path_rate: float = setting(0.1, range="[0, 1)")
    n_global_crops: int = setting(2, range=">= 1")
    n_local_crops: int = setting(8, range=">= 0")
    global_scale: tuple[float, float] = setting((0.4, 1.0), range="(0, 1]", ordered=True)
    local_scale: tuple[float, float] = setting((0.05, 0.4), range="(0, 1]", ordered=True)
    local_size: int = setting(0, range=">= 1", allow_zero=True)
    crop: Literal["rrc", "ect"] = "rrc"
    vflip: bool = False
    augment: dict[str, Any] = setting(default_factory=dict, of=MultiCropConfig)
    eval_teacher: bool = True
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_config(self)



def make_config(base: Any, overrides: dict[str, Any], presets: dict[str, dict[str, Any]] | None = None) -> Any:
    """``base`` (a config or its class) with ``overrides["preset"]`` applied first, then the other overrides.

    Backbone ``create_model`` arguments may come as ``backbone_kwargs``, a ``"backbone"`` dict or
    ``"backbone.<arg>"`` keys (the command line's form); they are merged into ``backbone_kwargs``.
    """
    overrides, backbone = split_backbone_overrides(overrides)
    if backbone:
        overrides["backbone_kwargs"] = backbone
    preset = overrides.pop("preset", None)
    cfg = base() if isinstance(base, type) else base
    if preset is not None:
        presets = presets or {}
        if preset not in presets:
            choices = ", ".join(sorted(presets)) or "none"
            raise HistofmError(f"Unknown preset {preset!r} for {type(cfg).__name__}; choose one of: {choices}.")
        cfg = config_replace(cfg, presets[preset])
    return config_replace(cfg, overrides)


def multicrop_transform(cfg: Any, img_size: int, patch_size: int) -> MultiCropTransform:
    """The multi-crop transform of a DINO-family config at global size ``img_size``."""
    sizes = scaled_multicrop_sizes(img_size, patch_size)
    if cfg.local_size:
        sizes["local_size"] = cfg.local_size
    crops = MultiCropConfig(
        n_global=cfg.n_global_crops, n_local=cfg.n_local_crops, global_scale=cfg.global_scale,
        local_scale=cfg.local_scale, crop=cfg.crop, vflip=cfg.vflip or cfg.crop == "ect",
        **sizes,
    )
    return MultiCropTransform(config_replace(crops, cfg.augment))


def split_crops(batch: Any, n_global: int) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
    """``(global crops, local crops, masks or None)`` from a batch.

    Accepts a list of crop tensors, ``(crops, labels)`` as given by a labelled dataset, or a
    dict ``{"crops": [...], "masks": (n_global * B, gh, gw)}`` with precomputed masks.
    """
    masks = None
    if isinstance(batch, dict):
        masks = batch.get("masks")
        batch = batch["crops"]
    elif isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], (list, tuple)):
        batch = batch[0]  # (crops, labels)
    if not isinstance(batch, (list, tuple)) or not all(isinstance(c, torch.Tensor) for c in batch):
        raise HistofmError("A DINO-family batch must be a list of crop tensors (use the method's multi-crop transform).")
    if len(batch) < n_global:
        raise HistofmError(f"The batch has {len(batch)} crops but the method expects {n_global} global crops first.")
    return list(batch[:n_global]), list(batch[n_global:]), masks


# --------------------------------------------------------------------------- method
class DINO(SSLMethod):
    """Student/teacher self-distillation on multi-crop views (see the module docstring).

    Args:
        arch: backbone name for :func:`histofm.create_model` (a ViT).
        cfg: the configuration.
        img_size: global crop size (the backbone's native size).
        use_mask_token: build the backbone with a mask token (iBOT, DINOv2).
    """

    step: torch.Tensor
    max_steps: torch.Tensor

    def __init__(self, arch: str, cfg: DINOConfig, img_size: int = 224, use_mask_token: bool = False) -> None:
        super().__init__()
        from histofm.registry import create_model

        self.cfg = cfg
        kwargs = self.backbone_kwargs(img_size)
        if use_mask_token:
            kwargs["use_mask_token"] = True
        student_backbone = create_model(arch, **kwargs)
        if not hasattr(student_backbone, "forward_features") or not hasattr(student_backbone, "num_prefix_tokens"):
            raise HistofmError(f"{type(self).__name__} needs a ViT backbone; {arch!r} is not one.")
        self.student = nn.ModuleDict({"backbone": student_backbone, "head": self._make_head(student_backbone.embed_dim)})
        self._add_heads(self.student, student_backbone.embed_dim)
        self.teacher = make_teacher(self.student)
        self.teacher.eval()
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_steps", torch.zeros((), dtype=torch.long))

    def backbone_kwargs(self, img_size: int) -> dict[str, Any]:
        """``create_model`` arguments of the student backbone."""
        return {"img_size": img_size, "drop_path_rate": self.cfg.drop_path_rate, **self.cfg.backbone_kwargs}

    def _make_head(self, in_dim: int) -> DINOHead:
        c = self.cfg
        return DINOHead(
            in_dim, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.head_layers, c.norm_last_layer, c.head_batch_norm
        )

    def _add_heads(self, branch: nn.ModuleDict, in_dim: int) -> None:
        """Hook for subclasses that add more heads (iBOT's patch head)."""

    # -------------------------------------------------------------- properties
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
        if int(self.max_steps) == 0:  # before the engine's first on_step_end: start of the warm-up
            return c.warmup_teacher_temp if c.teacher_temp_warmup > 0 else c.teacher_temp
        warm = int(round(c.teacher_temp_warmup * int(self.max_steps)))
        return linear_warmup_constant(int(self.step), warm, c.warmup_teacher_temp, c.teacher_temp)

    def last_layer_frozen(self) -> bool:
        return int(self.step) < math.ceil(self.cfg.freeze_last_layer * int(self.max_steps))

    def momentum(self, step: int, max_steps: int) -> float:
        return momentum_schedule(step, max_steps, self.cfg.momentum_teacher, self.cfg.momentum_teacher_final)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA update of the teacher; remembers the step for the temperature schedule."""
        ema_update(self.teacher, self.student, self.momentum(step, max_steps))
        self.step.fill_(step + 1)
        self.max_steps.fill_(max_steps)

    # -------------------------------------------------------------- forward
    @staticmethod
    def class_tokens(backbone: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Class token after the final norm, ``(B, D)``."""
        return backbone.forward_features(x, masks)[:, 0]

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        globals_, locals_, _ = split_crops(batch, self.cfg.n_global_crops)
        n_views = len(globals_) + len(locals_)
        g = torch.cat(globals_)  # (G*B, 3, S, S)
        temp = self.teacher_temp()
        with torch.no_grad():
            t_logits = self.teacher["head"](self.class_tokens(self.teacher["backbone"], g))  # (G*B, K)
        student_bb = self.student["backbone"]
        cls = [self.class_tokens(student_bb, g)]  # (G*B, D)
        if locals_:
            cls.append(self.class_tokens(student_bb, torch.cat(locals_)))  # (L*B, D)
        s_logits = self.student["head"](torch.cat(cls), freeze_last_layer=self.last_layer_frozen())
        B = globals_[0].shape[0]
        loss = self.dino_loss(s_logits.view(n_views, B, -1), t_logits.view(len(globals_), B, -1), temp)
        return {"loss": loss, "dino_loss": loss.detach(), "teacher_temp": torch.tensor(temp)}


def build(name: str, arch: str, *, img_size: int, overrides: dict[str, Any]) -> tuple[DINO, Callable[[Any], Any]]:
    """``histofm pretrain --method dino``: the method and its multi-crop transform."""
    cfg = make_config(DINOConfig, overrides)
    method = DINO(arch, cfg, img_size=img_size)
    return method, multicrop_transform(cfg, img_size, method.student["backbone"].patch_size)
