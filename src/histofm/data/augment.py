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
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from histofm.constants import IMAGENET_MEAN, IMAGENET_STD
from histofm.data.stain import HEDJitter
from histofm.errors import HistofmError
from histofm.settings import check_config, setting


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

    size: int = setting(224, range=">= 1")
    scale: tuple[float, float] = setting((0.2, 1.0), range="(0, 1]", ordered=True)
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), range="> 0", ordered=True)
    hflip: float = setting(0.5, range="[0, 1]")
    vflip: float = setting(0.5, range="[0, 1]")
    rot90: bool = True
    jitter_p: float = setting(0.8, range="[0, 1]")
    brightness: float = setting(0.4, range=">= 0")
    contrast: float = setting(0.4, range=">= 0")
    saturation: float = setting(0.2, range=">= 0")
    hue: float = setting(0.05, range="[0, 0.5]")
    grayscale_p: float = setting(0.2, range="[0, 1]")
    blur_p: float = setting(0.5, range="[0, 1]")
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), range="> 0", ordered=True)
    solarize_p: float = setting(0.0, range="[0, 1]")
    hed_p: float = setting(0.0, range="[0, 1]")
    hed_sigma: float = setting(0.05, range=">= 0")
    hed_bias: float = setting(0.01, range=">= 0")
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, range="[0, 1]")
    std: tuple[float, float, float] = setting(IMAGENET_STD, range="> 0")

    def __post_init__(self) -> None:
        check_config(self)



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


class BatchAugment(nn.Module):
    """The :func:`view_transform` recipe applied to a whole batch at once, on the batch's device.

    Per-sample torchvision pipelines spend most of their time in Python when tiles are
    small; here every random choice is drawn per sample as a tensor and applied with a
    handful of batched ops:

    * random resized crop, flips and 90-degree rotation fused into one affine sampling
      grid per sample (``F.affine_grid`` + bilinear ``grid_sample``; no antialiasing);
    * colour jitter in the fixed order brightness, contrast, saturation, hue (hue as a
      rotation of the chroma plane in YIQ space, a close approximation of torchvision's
      HSV shift), each sample with probability ``jitter_p``;
    * grayscale, Gaussian blur (a per-sample separable kernel), solarisation and HED jitter
      with their probabilities.

    Input: a batch ``(B, 3, H, W)`` normalised with ``cfg.mean``/``cfg.std`` (what
    :func:`eval_view` and :func:`base_view` produce); output: views ``(B, 3, size, size)``
    normalised the same way. Randomness comes from torch's global generator (the engine
    saves and restores it, so resumed runs stay exact).
    """

    def __init__(self, cfg: ViewConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self.hed = HEDJitter(cfg.hed_sigma, cfg.hed_bias, p=cfg.hed_p) if cfg.hed_p > 0 else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float() * self.std + self.mean  # (B, 3, H, W) in [0, 1]
            x = self._geometry(x)
            x = self._colour(x.clamp(0, 1))
            return (x - self.mean) / self.std

    def _rand(self, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
        return torch.rand(n).to(device) * (hi - lo) + lo

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        c, B, dev = self.cfg, x.shape[0], x.device
        H, W = x.shape[-2:]
        area = self._rand(B, *c.scale, dev)
        log_r = self._rand(B, torch.tensor(c.ratio[0]).log().item(), torch.tensor(c.ratio[1]).log().item(), dev)
        ratio = log_r.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of W
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(B).to(dev) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
        cy = (torch.rand(B).to(dev) * 2 - 1) * (1 - h)
        sx = torch.where(torch.rand(B).to(dev) < c.hflip, -1.0, 1.0) * w
        sy = torch.where(torch.rand(B).to(dev) < c.vflip, -1.0, 1.0) * h
        k = torch.randint(0, 4, (B,)).to(dev) if c.rot90 else torch.zeros(B, dtype=torch.long, device=dev)
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=dev)[k]
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=dev)[k]
        theta = torch.zeros(B, 2, 3, device=dev)  # output (u, v) -> input (x, y) = S R (u, v) + t
        theta[:, 0, 0], theta[:, 0, 1] = sx * cos, -sx * sin
        theta[:, 1, 0], theta[:, 1, 1] = sy * sin, sy * cos
        theta[:, 0, 2], theta[:, 1, 2] = cx, cy
        grid = F.affine_grid(theta, [B, 3, c.size, c.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        c, B, dev = self.cfg, x.shape[0], x.device

        def per_sample(p: float) -> torch.Tensor:
            return (torch.rand(B).to(dev) < p).view(B, 1, 1, 1)

        if self.hed is not None:
            x = self.hed(x)
        if c.jitter_p > 0:
            on = per_sample(c.jitter_p)
            y = x
            if c.brightness > 0:
                y = y * self._rand(B, 1 - c.brightness, 1 + c.brightness, dev).view(B, 1, 1, 1)
            if c.contrast > 0:
                m = _gray(y).mean((1, 2, 3), keepdim=True)
                y = (y - m) * self._rand(B, 1 - c.contrast, 1 + c.contrast, dev).view(B, 1, 1, 1) + m
            if c.saturation > 0:
                g = _gray(y)
                y = (y - g) * self._rand(B, 1 - c.saturation, 1 + c.saturation, dev).view(B, 1, 1, 1) + g
            if c.hue > 0:
                y = _rotate_hue(y, self._rand(B, -c.hue, c.hue, dev) * 2 * torch.pi)
            x = torch.where(on, y.clamp(0, 1), x)
        if c.grayscale_p > 0:
            x = torch.where(per_sample(c.grayscale_p), _gray(x).expand_as(x), x)
        if c.blur_p > 0:
            x = torch.where(per_sample(c.blur_p), _blur(x, self._rand(B, *c.blur_sigma, dev), c.size), x)
        if c.solarize_p > 0:
            x = torch.where(per_sample(c.solarize_p) & (x >= 0.5), 1 - x, x)
        return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``(B, 1, H, W)`` (torchvision's grayscale weights)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by ``angle`` ``(B,)`` radians."""
    m = _RGB2YIQ.to(x.device)
    yiq = torch.einsum("ij,bjhw->bihw", m, x)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m), yiq)


def _blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample separable Gaussian blur; kernel side ~10% of ``size`` (odd, >= 3), reflect padding."""
    B, C, H, W = x.shape
    k = max(3, int(0.1 * size) // 2 * 2 + 1)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, kern.view(B * C, 1, 1, k), groups=B * C)
    y = F.conv2d(y, kern.view(B * C, 1, k, 1), groups=B * C)
    return y.view(B, C, H, W)


def base_view(
    size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """Per-sample transform for :class:`BatchAugment`: resize to ``size`` (no crop), normalise."""
    return v2.Compose(
        [v2.ToImage(), v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )


class MultiView:
    """Per-sample transform returning one view per transform: ``[t_1(img), ..., t_k(img)]``.

    ``MultiView([t] * 2)`` is SimCLR's pair of views; ``MultiView([t1, t2])`` BYOL/MoCo v3's
    asymmetric pair; ``MultiView([g] * 2 + [l] * 6)`` a multi-crop sample.
    """

    def __init__(self, transforms: Sequence[Callable[[Any], torch.Tensor]]) -> None:
        if not transforms:
            raise HistofmError("MultiView needs at least one transform; pass a list of view transforms.")
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
