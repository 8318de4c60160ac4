"""The PLUTO recipe: DINOv2 + MAE + a Fourier loss on a FlexiViT, over tiles at four magnifications.

Juyal et al. 2024, "PLUTO: Pathology-Universal Transformer", arXiv 2405.07905.
PLUTO is a FlexiViT-S (Beyer et al. 2023, arXiv 2212.08013; the ``pluto`` model
of :mod:`histofm.zoo.pluto`): one set of weights reads an image with 8, 16 or
32 px patches, the kernel being pseudo-inverse resized per patch size. The
objective sums four terms on a student/teacher pair:

* DINO's class-token loss and iBOT's masked patch-token loss, with KoLeo and
  Sinkhorn-Knopp centering: DINOv2's terms (:class:`~histofm.methods.losses.DINOLoss`,
  :class:`~histofm.methods.losses.IBOTPatchLoss`, :class:`~histofm.methods.losses.KoLeoLoss`),
  with DINOv2's settings (:class:`~histofm.methods.dinov2.DINOv2Config`);
* an MAE reconstruction loss (:mod:`histofm.methods.mae`): the student encodes
  25 % of the patches of each global crop and a shallow decoder predicts the
  normalised pixels of the others;
* a Fourier-domain loss on the same reconstructions (below).

Every step draws ONE patch size from {8, 16, 32} for the whole step (student,
teacher, iBOT masks and MAE masks, which are in patches and so scale with it:
"multi-scale masking"). The draw is a function of the step number only, so all
ranks agree and a resumed run repeats it. Tiles are sampled at 0.25, 0.5, 1 and
2 um/px (:class:`MultiScaleTile`) before the multi-crop views are cut.

    L = L_DINO + w_iBOT L_iBOT + w_KoLeo L_KoLeo + w_MAE L_MAE + w_F L_Fourier

The exact Fourier loss of PLUTO is not public [U]. This file uses an L1
distance between LOG-AMPLITUDE spectra of the predicted and true (normalised)
pixels of each masked patch::

    A(z) = sqrt(|rfft2(z)|^2 + eps)           # per channel, orthonormal 2-D FFT of a p x p patch
    L_F  = mean over masked patches of  mean | log(1 + A(pred)) - log(1 + A(target)) |

Why this form: (1) a squared error between complex spectra equals the pixel
MSE (Parseval), so it would add nothing to MAE; only a non-linear function of
the spectrum can. (2) The amplitude spectrum ignores phase, i.e. WHERE in the
patch a structure lies, and asks for the right amount of structure at each
spatial frequency: exactly what an MSE-trained decoder gives up when it blurs
unpredictable detail (chromatin texture, fibre edges) to the mean. (3) The
log flattens the steep fall-off of natural-image spectra so high frequencies
count; the focal frequency loss (Jiang et al. 2021, arXiv 2012.12821) reweights
frequencies for the same reason. The spectrum is taken per patch at the step's
patch size, so its frequency bands follow the FlexiViT scale.

Scale honesty: the weights of the MAE and Fourier terms, the decoder size and
the MAE mask ratio are not given by the paper [U]; the defaults below are ours.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from histofm.errors import HistofmError
from histofm.layers.heads import class_and_patch_logits, prototypes_frozen
from histofm.methods.base import SSLMethod, split_crops
from histofm.methods.dinov2 import PRESETS as DINOV2_PRESETS
from histofm.methods.dinov2 import DINOv2Config, dinov2_backbone_kwargs
from histofm.methods.distillation import build_student_teacher, make_config, multicrop_transform
from histofm.methods.losses import DINOLoss, IBOTPatchLoss, KDEUniformityLoss, KoLeoLoss, teacher_temperature
from histofm.methods.masking import BlockMaskCollator
from histofm.methods.patches import (
    MAEDecoder,
    denormalize_patches,
    encode_visible,
    mae_loss,
    normalize_patches,
    patchify,
    random_masking,
    unpatchify,
)
from histofm.methods.pictures import (
    ReconstructionCallback,
    attach_reconstructions,
    picture_set,
    run_step_callbacks,
)
from histofm.settings import setting
from histofm.utils.ema import ema_update
from histofm.utils.schedules import momentum_schedule


@dataclass(frozen=True)
class PLUTOConfig(DINOv2Config):
    """DINOv2 settings plus PLUTO's. Fields beyond :class:`~histofm.methods.dinov2.DINOv2Config`:

    Attributes:
        patch_sizes: FlexiViT patch sizes drawn (uniformly) per step.
        mae_weight, fourier_weight: weights of the MAE and Fourier terms [U].
        mae_mask_ratio: fraction of patches hidden from the MAE encoder pass.
        decoder_dim, decoder_depth, decoder_heads: the (shallow) MAE decoder [U].
        decoder_patch: the decoder predicts a ``decoder_patch x decoder_patch`` rendition of every
            patch, resized (bilinear, antialiased) to the step's patch size.
        norm_pix_loss: MAE targets are per-patch normalised pixels.
        mpps: magnifications (um/px) drawn per tile; ``source_mpp``: that of the input tiles.
    """

    patch_sizes: tuple[int, ...] = setting((8, 16, 32), range=">= 1")
    mae_weight: float = setting(1.0, range=">= 0")
    fourier_weight: float = setting(0.1, range=">= 0")
    mae_mask_ratio: float = setting(0.75, range="[0, 1)")
    decoder_dim: int = setting(256, range=">= 1")
    decoder_depth: int = setting(4, range=">= 1")
    decoder_heads: int = setting(8, range=">= 1", divides="decoder_dim")
    decoder_patch: int = setting(16, range=">= 1")
    norm_pix_loss: bool = True
    mpps: tuple[float, ...] = setting((0.25, 0.5, 1.0, 2.0), range="> 0")
    source_mpp: float = setting(0.5, range="> 0")

    def __post_init__(self) -> None:
        super().__post_init__()  # checks the declarations above too (patch_sizes >= 1, mpps > 0, not empty)


#: ``cpu_small``: DINOv2's small-run preset, a 2-block decoder, 2 local crops.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu_small": {**DINOV2_PRESETS["cpu_small"], "n_local_crops": 2, "decoder_dim": 64, "decoder_depth": 2,
                  "decoder_heads": 4},
}


# --------------------------------------------------------------------------- Fourier loss
def fourier_amplitude_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int, channels: int = 3,
    eps: float = 1e-8,
) -> torch.Tensor:
    """L1 between log-amplitude spectra of predicted and target patches, averaged over masked patches.

    Args:
        pred, target: ``(B, N, p*p*C)`` patches in :func:`~histofm.methods.mae.patchify` order
            (compare like with like: both normalised, or both raw).
        mask: ``(B, N)``, True where the patch was hidden.
        patch_size: ``p``; channels: ``C``.
        eps: keeps the amplitude differentiable at 0.
    """
    B, N, _ = pred.shape
    p = patch_size
    with torch.autocast(pred.device.type, enabled=False):  # FFTs in float32
        def log_amp(z: torch.Tensor) -> torch.Tensor:
            z = z.float().reshape(B, N, p, p, channels).permute(0, 1, 4, 2, 3)  # (B, N, C, p, p)
            f = torch.fft.rfft2(z, norm="ortho")  # (B, N, C, p, p//2+1)
            return torch.log1p(torch.sqrt(f.real.pow(2) + f.imag.pow(2) + eps))

        per_patch = (log_amp(pred) - log_amp(target)).abs().mean(dim=(-3, -2, -1))  # (B, N)
        m = mask.float()
        return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def resize_patches(patches: torch.Tensor, src: int, dst: int, channels: int = 3) -> torch.Tensor:
    """Resize every ``src x src`` patch of ``(B, N, src*src*C)`` to ``dst x dst`` (bilinear, antialiased)."""
    if src == dst:
        return patches
    B, N, _ = patches.shape
    x = patches.reshape(B * N, src, src, channels).permute(0, 3, 1, 2)  # (BN, C, s, s)
    with torch.autocast(x.device.type, enabled=False):  # CPU has no bf16 antialiased bilinear kernel
        y = F.interpolate(x.float(), size=(dst, dst), mode="bilinear", antialias=True, align_corners=False)
    return y.to(x.dtype).permute(0, 2, 3, 1).reshape(B, N, dst * dst * channels)


# --------------------------------------------------------------------------- multi-scale tiles
class MultiScaleTile:
    """Pick a magnification per tile and return the tile at it: a random square region, resized.

    For a target of ``m`` um/px from a source at ``s`` um/px, a region of
    ``out_size * m / s`` source pixels becomes ``out_size`` pixels (so 2 um/px from
    0.5 um/px reads 4x the field of view; 0.25 um/px zooms in 2x). Magnifications
    whose region does not fit in the input are skipped; the coarsest that fits is
    used when none of the others do.

    Args:
        out_size: output side (the global-crop size).
        mpps: target magnifications, drawn uniformly among those that fit.
        source_mpp: magnification of the input tiles.
    """

    def __init__(self, out_size: int, mpps: Sequence[float] = (0.25, 0.5, 1.0, 2.0), source_mpp: float = 0.5) -> None:
        self.out_size, self.mpps, self.source_mpp = out_size, tuple(mpps), source_mpp
        self.last_mpp: float | None = None  # for inspection and tests

    def __call__(self, img: Image.Image) -> Image.Image:
        side_max = min(img.size)
        sides = {m: int(round(self.out_size * m / self.source_mpp)) for m in self.mpps}
        fitting = [m for m in self.mpps if sides[m] <= side_max]
        if not fitting:
            fitting = [min(self.mpps)]
        mpp = fitting[int(torch.randint(len(fitting), (1,)))]
        side = min(sides[mpp], side_max)
        left = int(torch.randint(img.size[0] - side + 1, (1,)))
        top = int(torch.randint(img.size[1] - side + 1, (1,)))
        self.last_mpp = mpp
        region = img.crop((left, top, left + side, top + side))
        return region.resize((self.out_size, self.out_size), Image.Resampling.BICUBIC)


class PLUTOTransform:
    """Multi-scale tile, then DINOv2's multi-crop views (a list of crop tensors)."""

    def __init__(self, scale: MultiScaleTile, crops: Callable[[Image.Image], Any]) -> None:
        self.scale, self.crops = scale, crops

    def __call__(self, img: Image.Image) -> Any:  # noqa: ANN401
        return self.crops(self.scale(img.convert("RGB")))



# --------------------------------------------------------------------------- method
class PLUTO(SSLMethod):
    """DINOv2's terms + MAE + Fourier loss on a FlexiViT backbone with a per-step patch size.

    Args:
        arch: a FlexiViT (``"pluto"``; small variants through ``backbone_kwargs``).
        cfg: :class:`PLUTOConfig`.
        img_size: global crop size (a multiple of every patch size).
    """

    cfg: PLUTOConfig
    step: torch.Tensor
    max_steps: torch.Tensor

    def __init__(self, arch: str, cfg: PLUTOConfig, img_size: int = 224) -> None:
        super().__init__()
        self.cfg = cfg
        # The student/teacher pair and the DINOv2 terms (see histofm.methods.dinov2).
        patch_head = None if cfg.shared_head else cfg.patch_out_dim
        kwargs = dinov2_backbone_kwargs(cfg, img_size)
        self.student, self.teacher = build_student_teacher("PLUTO", arch, cfg, kwargs, patch_out_dim=patch_head)
        centering = dict(centering=cfg.centering, sinkhorn_iterations=cfg.sinkhorn_iterations)
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, **centering)
        patch_dim = cfg.out_dim if cfg.shared_head else cfg.patch_out_dim
        self.ibot_loss = IBOTPatchLoss(patch_dim, cfg.student_temp, cfg.center_momentum, **centering)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_steps", torch.zeros((), dtype=torch.long))
        bb = self.student["backbone"]
        if cfg.efficient_drop_path and hasattr(bb, "set_efficient_drop_path"):
            bb.set_efficient_drop_path(True)
        self.regularizer: nn.Module | None = None
        if cfg.regularizer == "koleo":
            self.regularizer = KoLeoLoss()
        elif cfg.regularizer == "kde":
            self.regularizer = KDEUniformityLoss(cfg.kde_kappa)
        # PLUTO's own parts: a FlexiViT and an MAE decoder.
        if not hasattr(bb, "set_patch_size"):
            raise HistofmError(f"PLUTO needs a FlexiViT backbone with a run-time patch size (e.g. 'pluto'); {arch!r} is not one.")
        bad = [p for p in cfg.patch_sizes if img_size % p]
        if bad:
            raise HistofmError(f"img_size {img_size} is not a multiple of the patch size(s) {bad}; use a multiple of {math.lcm(*cfg.patch_sizes)}.")
        if img_size < 2 * max(cfg.patch_sizes):
            raise HistofmError(
                f"img_size {img_size} gives a single {max(cfg.patch_sizes)} px patch, too few for MAE; "
                f"use at least {2 * max(cfg.patch_sizes)} or smaller patch_sizes."
            )
        self.in_chans = bb.patch_embed.proj.in_channels
        # The decoder lives beside (not inside) the student so the teacher stays a copy of the student.
        self.mae_decoder = MAEDecoder(
            bb.embed_dim, cfg.decoder_patch**2 * self.in_chans, decoder_dim=cfg.decoder_dim,
            depth=cfg.decoder_depth, num_heads=cfg.decoder_heads, num_prefix_tokens=bb.num_prefix_tokens,
        )
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        self.register_buffer("img_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("img_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.step_callbacks: list[Callable[[nn.Module, int], Any]] = []

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        """The teacher backbone (what PLUTO evaluates), or the student's with ``eval_teacher=False``."""
        return self.teacher["backbone"] if self.cfg.eval_teacher else self.student["backbone"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.student, self.mae_decoder) for p in m.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> PLUTO:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop path in the teacher
        return self

    # ---------------------------------------------------------------- schedules
    def teacher_temp(self) -> float:
        """``tau_t`` at the current step (linear warm-up, then constant), for both distillation losses."""
        c = self.cfg
        return teacher_temperature(
            int(self.step), int(self.max_steps), c.warmup_teacher_temp, c.teacher_temp, c.teacher_temp_warmup
        )

    def last_layer_frozen(self) -> bool:
        return prototypes_frozen(int(self.step), int(self.max_steps), self.cfg.freeze_last_layer)

    # ---------------------------------------------------------------- patch size
    def patch_size_for_step(self, step: int, sizes: Sequence[int] | None = None) -> int:
        """The patch size of global step ``step``: a uniform draw seeded by the step alone."""
        sizes = tuple(sizes or self.cfg.patch_sizes)
        g = torch.Generator().manual_seed(1_000_003 * int(step) + 12_345)
        return int(sizes[int(torch.randint(len(sizes), (1,), generator=g))])

    def set_patch_size(self, patch_size: int) -> None:
        """Use ``patch_size`` in the student and the teacher backbones."""
        self.student["backbone"].set_patch_size(patch_size)
        self.teacher["backbone"].set_patch_size(patch_size)

    # ---------------------------------------------------------------- MAE branch
    def mae_predict(
        self, x: torch.Tensor, patch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student MAE on ``x``: predictions ``(B, N, p*p*C)`` at the step's patch size and the mask ``(B, N)``."""
        bb = self.student["backbone"]
        B, C, H, W = x.shape
        grid = (H // patch_size, W // patch_size)
        ids_keep, mask, ids_restore = random_masking(
            B, grid[0] * grid[1], self.cfg.mae_mask_ratio, device=x.device, generator=generator
        )
        tokens = bb.prepare_tokens(x, patch_size=patch_size)  # (B, P + N, D)
        latent = encode_visible(bb, x, ids_keep, tokens=tokens)
        pred = self.mae_decoder(latent, ids_restore, grid)  # (B, N, r*r*C)
        return resize_patches(pred, self.cfg.decoder_patch, patch_size, C), mask

    def mae_losses(self, x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_MAE, L_Fourier)`` of the global crops ``x``."""
        pred, mask = self.mae_predict(x, patch_size)
        target = patchify(x, patch_size)
        rec = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
        spec_target = normalize_patches(target) if self.cfg.norm_pix_loss else target
        fourier = fourier_amplitude_loss(pred, spec_target, mask, patch_size, self.in_chans)
        return rec, fourier

    # ---------------------------------------------------------------- DINOv2 terms
    def dinov2_losses(
        self, globals_: list[torch.Tensor], locals_: list[torch.Tensor], masks: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """DINOv2's step at the current patch size: class-token, masked patch-token and KoLeo/KDE terms."""
        c = self.cfg
        G, B = len(globals_), globals_[0].shape[0]
        n_views = G + len(locals_)
        g = torch.cat(globals_)  # (G*B, 3, S, S)
        s_bb, t_bb = self.student["backbone"], self.teacher["backbone"]
        if masks is None:  # block masks on the step's grid, half of the global crops masked
            grid = (g.shape[-2] // s_bb.patch_size, g.shape[-1] // s_bb.patch_size)
            collator = BlockMaskCollator(grid, c.mask_probability, c.mask_ratio, min_aspect=c.mask_min_aspect)
            masks = collator(g.shape[0]).to(g.device)  # (G*B, gh, gw)
        flat = masks.reshape(g.shape[0], -1).to(device=g.device, dtype=torch.bool)  # (G*B, N)
        P = s_bb.num_prefix_tokens
        with torch.no_grad():  # the teacher sees the global crops, unmasked
            t_tok = t_bb.forward_features(g)  # (G*B, P+N, D)
            t_cls, t_patch = class_and_patch_logits(self.teacher, t_tok[:, 0], t_tok[:, P:][flat])
        s_tok = s_bb.forward_features(g, flat)  # (G*B, P+N, D), masked patches replaced by the mask token
        s_cls_tokens = s_tok[:, 0]  # (G*B, D)
        cls = [s_cls_tokens]
        if locals_:
            cls.append(s_bb.forward_features(torch.cat(locals_))[:, 0])  # (L*B, D)
        freeze = self.last_layer_frozen()
        s_cls, s_patch = class_and_patch_logits(self.student, torch.cat(cls), s_tok[:, P:][flat], freeze)

        temp = self.teacher_temp()
        dino = self.dino_loss(s_cls.view(n_views, B, -1), t_cls.view(G, B, -1), temp)
        ibot = self.ibot_loss(s_patch, t_patch, masks, temp)
        loss = dino + c.patch_loss_weight * ibot
        out = {"dino_loss": dino.detach(), "ibot_loss": ibot.detach()}
        if self.regularizer is not None:
            reg = sum(self.regularizer(x) for x in s_cls_tokens.chunk(G))  # per global crop
            loss = loss + c.reg_weight * reg
            out[f"aux_{c.regularizer}"] = reg.detach()  # already inside "loss" (engine convention)
        out.update(loss=loss, teacher_temp=torch.tensor(temp), mask_ratio=masks.float().mean().detach())
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        globals_, locals_, masks = split_crops(batch, self.cfg.n_global_crops)
        sides = {int(s) for c in globals_ + locals_ for s in c.shape[-2:]}
        usable = [p for p in self.cfg.patch_sizes if all(s % p == 0 for s in sides)]
        if not usable:
            raise HistofmError(
                f"No patch size in {self.cfg.patch_sizes} divides the crop sizes {sorted(sides)}; "
                "use crop sizes that are multiples of the patch sizes."
            )
        p = self.patch_size_for_step(int(self.step), usable)
        self.set_patch_size(p)
        out = self.dinov2_losses(globals_, locals_, masks)  # at patch size p (iBOT masks follow the grid)
        rec, fourier = self.mae_losses(torch.cat(globals_), p)
        c = self.cfg
        out["loss"] = out["loss"] + c.mae_weight * rec + c.fourier_weight * fourier
        out.update(mae_loss=rec.detach(), fourier_loss=fourier.detach(), patch_size=torch.tensor(float(p)))
        return out

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA teacher and schedules (as DINOv2), back to the base patch size, then the step callbacks."""
        momentum = momentum_schedule(step, max_steps, self.cfg.momentum_teacher, self.cfg.momentum_teacher_final)
        ema_update(self.teacher, self.student, momentum)
        self.step.fill_(step + 1)
        self.max_steps.fill_(max_steps)
        self.set_patch_size(self.student["backbone"].base_patch_size)  # embed() and exports: a fixed size
        run_step_callbacks(self, step)

    # ---------------------------------------------------------------- pictures
    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, generator: torch.Generator | None = None, patch_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """MAE pictures of the student at ``patch_size`` (default: the largest that divides ``x``)."""
        p = patch_size or max(q for q in self.cfg.patch_sizes if x.shape[-1] % q == 0 and x.shape[-2] % q == 0)
        was_training = self.training
        self.eval()
        try:
            B, C, H, W = x.shape
            pred, mask = self.mae_predict(x, p, generator)
            target = patchify(x, p)
            err = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
            if self.cfg.norm_pix_loss:
                pred = denormalize_patches(pred, target)
            img = unpatchify(pred, p, (H // p, W // p), C)
            return {**picture_set(x, img, mask, p, self.img_mean, self.img_std), "mse": err}
        finally:
            self.train(was_training)

    def attach_reconstructions(
        self, images: torch.Tensor, out_dir: str | os.PathLike[str], every: int = 100
    ) -> ReconstructionCallback:
        """Save MAE reconstructions of ``images`` to ``out_dir`` now and every ``every`` steps."""
        return attach_reconstructions(self, images, out_dir, every)


# --------------------------------------------------------------------------- builder
def build(
    name: str, arch: str = "pluto", *, img_size: int = 224, overrides: dict[str, Any] | None = None
) -> tuple[PLUTO, PLUTOTransform]:
    """``histofm pretrain --method pluto``: the method and its multi-scale, multi-crop transform.

    ``arch`` must be a FlexiViT (``"pluto"``); backbone arguments go in
    ``overrides["backbone_kwargs"]`` (as for DINOv2), e.g. ``{"depth": 2, "embed_dim": 64}``.
    """
    cfg = make_config(PLUTOConfig, dict(overrides or {}), PRESETS)  # backbone keys go to backbone_kwargs
    method = PLUTO(arch, cfg, img_size=img_size)
    crops = multicrop_transform(cfg, img_size, max(cfg.patch_sizes))  # local crops: multiples of every patch size
    return method, PLUTOTransform(MultiScaleTile(img_size, cfg.mpps, cfg.source_mpp), crops)
