"""Training augmentations for self-supervised learning on tiles (torchvision transforms v2).

A *view* is one randomly augmented copy of a tile. Contrastive methods (SimCLR,
MoCo, CLIP's image side) and self-distillation methods build their samples from
several views of the same tile, so this module gives

* building blocks missing from torchvision: :class:`RandomRotate90` (tissue has
  no "up"), and :class:`~histofm.data.stain.HEDJitter` (stain variation);
* :class:`ViewConfig` + :func:`view_transform`: the SimCLR/MoCo/BYOL recipe
  (Chen et al. 2020, arXiv 2002.05709: random resized crop, flip, colour jitter
  0.8 * (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, Gaussian blur,
  solarisation for the second BYOL view), with pathology defaults: vertical
  flips and 90-degree rotations on, a smaller hue jitter, optional HED jitter;
* :class:`MultiView`: a per-sample transform that returns a list of views;
* :func:`eval_view`: the deterministic resize + centre crop + normalise used to embed tiles.

Every view ends as a float tensor ``(3, size, size)`` normalised with ``mean`` / ``std``.
Randomness comes from torch's global generator, which the engine seeds per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from histofm.data.stain import HEDJitter
from histofm.registry import IMAGENET_MEAN, IMAGENET_STD


class RandomRotate90(nn.Module):
    """Rotate by ``k * 90`` degrees, ``k`` uniform in {0, 1, 2, 3} (tensor images ``(..., H, W)``)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()))
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


@dataclass(frozen=True)
class ViewConfig:
    """One view's augmentation recipe.

    Attributes:
        size: output side in pixels.
        scale: area range of the random resized crop (relative to the input).
        ratio: aspect-ratio range of the crop.
        hflip, vflip: flip probabilities.
        rot90: apply a random multiple of 90 degrees.
        jitter_p: probability of colour jitter with strengths ``brightness``, ``contrast``,
            ``saturation``, ``hue``.
        grayscale_p: probability of converting to grey.
        blur_p: probability of a Gaussian blur with sigma in ``blur_sigma`` (kernel ~ 10% of size).
        solarize_p: probability of solarisation (threshold 0.5).
        hed_p: probability of HED stain jitter with ``hed_sigma`` / ``hed_bias``.
        mean, std: normalisation.
    """

    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.05
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    hed_p: float = 0.0
    hed_sigma: float = 0.05
    hed_bias: float = 0.01
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def view_transform(cfg: ViewConfig) -> v2.Compose:
    """The augmentation pipeline of one view: PIL image or tensor in, normalised float tensor out."""
    ops: list[Callable[..., Any]] = [
        v2.ToImage(),
        v2.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
    ]
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ops.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.rot90:
        ops.append(RandomRotate90())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.hed_p > 0:
        ops.append(HEDJitter(cfg.hed_sigma, cfg.hed_bias, p=cfg.hed_p))
    if cfg.jitter_p > 0:
        jitter = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        ops.append(v2.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p > 0:
        kernel = max(3, int(0.1 * cfg.size) // 2 * 2 + 1)  # odd, ~10% of the side as in SimCLR
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=cfg.blur_sigma)], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        ops.append(v2.RandomSolarize(0.5, p=cfg.solarize_p))
    ops.append(v2.Normalize(cfg.mean, cfg.std))
    return v2.Compose(ops)


class MultiView:
    """Per-sample transform returning one view per transform: ``[t_1(img), ..., t_k(img)]``.

    ``MultiView([t] * 2)`` is SimCLR's pair of views; ``MultiView([t1, t2])`` BYOL/MoCo v3's
    asymmetric pair; ``MultiView([g] * 2 + [l] * 6)`` a multi-crop sample.
    """

    def __init__(self, transforms: Sequence[Callable[[Any], torch.Tensor]]) -> None:
        if not transforms:
            raise ValueError("MultiView needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> list[torch.Tensor]:  # noqa: ANN401
        return [t(img) for t in self.transforms]

    def __repr__(self) -> str:
        return f"MultiView({len(self.transforms)} views)"


def two_views(cfg: ViewConfig, second: ViewConfig | None = None) -> MultiView:
    """Two views with ``cfg`` (or ``cfg`` then ``second``, for asymmetric recipes)."""
    return MultiView([view_transform(cfg), view_transform(second or cfg)])


def eval_view(
    size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """Deterministic preprocessing: resize the shorter side to ``size``, centre crop, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
