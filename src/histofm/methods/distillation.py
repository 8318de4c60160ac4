"""Plumbing shared by the self-distillation methods (DINO, iBOT, DINOv2, PLUTO); no training step here.

What is identical in those methods and not part of their idea: the settings they all
have (:class:`DistillationConfig`, and :class:`MaskedDistillationConfig` for those that
mask patches), reading presets and overrides (:func:`make_config`), building the
student/teacher pair (:func:`build_student_teacher`), and the multi-crop view transform
(:func:`multicrop_transform`). Nothing here runs during a training step: each method's
step (reading the batch, what the teacher and the student see, which losses, the
schedules and the EMA update) is written out in its own file, so that file reads alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from histofm.data.multicrop import MultiCropConfig, MultiCropTransform, scaled_multicrop_sizes
from histofm.errors import HistofmError
from histofm.layers.heads import DINOHead
from histofm.settings import check_config, config_replace, setting, split_backbone_overrides
from histofm.utils.ema import make_teacher


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DistillationConfig:
    """Settings every student/teacher method has, with DINO's defaults (ViT-S/16, main_dino.py).

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
        check_config(self)  # types, choices and ranges declared above (and in subclasses)


@dataclass(frozen=True)
class MaskedDistillationConfig(DistillationConfig):
    """:class:`DistillationConfig` plus the masked patch-token term (iBOT, DINOv2, PLUTO), iBOT's defaults.

    Attributes:
        patch_out_dim: patch prototypes (equal to ``out_dim`` when the head is shared).
        shared_head: one head for class and patch tokens (iBOT's choice; DINOv2 separates them).
        patch_loss_weight: weight of the patch loss (``lambda_2`` in iBOT).
        mask_probability, mask_ratio: fraction of global crops masked and their ratio range.
        mask_min_aspect: aspect range of the mask blocks.
    """

    patch_out_dim: int = setting(8192, range=">= 1")
    shared_head: bool = True
    patch_loss_weight: float = setting(1.0, range=">= 0")
    mask_probability: float = setting(0.5, range="[0, 1]")
    mask_ratio: tuple[float, float] = setting((0.1, 0.5), range="[0, 1)", ordered=True)
    mask_min_aspect: float = setting(0.3, range="(0, 1]")


def make_config(base: Any, overrides: dict[str, Any], presets: dict[str, dict[str, Any]] | None = None) -> Any:  # noqa: ANN401
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


# --------------------------------------------------------------------------- student and teacher
def dino_head(cfg: DistillationConfig, in_dim: int, out_dim: int) -> DINOHead:
    """A :class:`~histofm.layers.heads.DINOHead` with ``out_dim`` prototypes and the config's MLP."""
    return DINOHead(
        in_dim, out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.norm_last_layer, cfg.head_batch_norm
    )


def build_student_teacher(
    method: str, arch: str, cfg: DistillationConfig, backbone_kwargs: dict[str, Any], patch_out_dim: int | None = None
) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """The student ``{"backbone", "head"[, "patch_head"]}`` and its frozen EMA copy, the teacher.

    Args:
        method: the method's name, for the error message.
        arch: backbone name for :func:`histofm.create_model` (a ViT).
        cfg: the settings of the heads.
        backbone_kwargs: ``create_model`` arguments of the backbone.
        patch_out_dim: add a separate patch head with this many prototypes (``None``: none).

    The teacher is in eval mode (no dropout, no stochastic depth) and gets no gradients.
    """
    from histofm.registry import create_model

    backbone = create_model(arch, **backbone_kwargs)
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "num_prefix_tokens"):
        raise HistofmError(f"{method} needs a ViT backbone; {arch!r} is not one.")
    student = nn.ModuleDict({"backbone": backbone, "head": dino_head(cfg, backbone.embed_dim, cfg.out_dim)})
    if patch_out_dim is not None:
        student["patch_head"] = dino_head(cfg, backbone.embed_dim, patch_out_dim)
    teacher = make_teacher(student)
    teacher.eval()
    return student, teacher


# --------------------------------------------------------------------------- views
def multicrop_transform(cfg: DistillationConfig, img_size: int, patch_size: int) -> MultiCropTransform:
    """The multi-crop transform of a config at global size ``img_size`` (local crops: multiples of ``patch_size``)."""
    sizes = scaled_multicrop_sizes(img_size, patch_size)
    if cfg.local_size:
        sizes["local_size"] = cfg.local_size
    crops = MultiCropConfig(
        n_global=cfg.n_global_crops, n_local=cfg.n_local_crops, global_scale=cfg.global_scale,
        local_scale=cfg.local_scale, crop=cfg.crop, vflip=cfg.vflip or cfg.crop == "ect",
        **sizes,
    )
    return MultiCropTransform(config_replace(crops, cfg.augment))
