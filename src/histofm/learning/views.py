"""Weak and strong views for consistency training, batched on the tensor's device.

FixMatch (arXiv 2001.07685) pairs a *weak* view (flip and shift) that produces
the pseudo-label with a *strong* view (RandAugment or CTAugment plus Cutout) that
must reproduce it. RandAugment's natural-image menu (hue rotation, posterize,
solarize, equalize, invert) makes H&E look like no stain a scanner produces, so
the strong view here is built only from changes real slides show:

* geometry: flips, 90-degree rotations, a small shift with reflection at the
  border (tissue has no "up");
* stain: the Tellez et al. 2018 (arXiv 1808.05896) HED jitter: colour-deconvolve
  to haematoxylin, eosin, DAB concentrations with the Ruifrok-Johnston matrix
  (:mod:`histofm.data.stain`), scale and shift each, convolve back::

      c = OD(x) M^-1,   c'_s = a_s c_s + b_s,   a_s ~ U(1 - sigma, 1 + sigma),  b_s ~ U(-bias, bias)

* scanner: mild brightness, contrast and saturation changes (never hue),
  Gaussian blur (focus), and optionally a Cutout square (a fold or a bubble;
  off by default, see :class:`ViewConfig`).

All functions take a float batch ``(B, 3, H, W)`` in ``[0, 1]`` and a
``torch.Generator`` so runs are reproducible; nothing loops over images in Python
except the blur's per-sample kernels, which are one grouped convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from histofm.data.stain import HED_FROM_RGB, RGB_FROM_HED

_LOG_ADJUST = math.log(1e-6)  # histofm.data.stain's (scikit-image's) optical-density unit

@dataclass(frozen=True)
class ViewConfig:
    """Strengths of the weak and strong views.

    Attributes:
        flip_rot: random flips and 90-degree rotations (tissue has no orientation).
        shift: largest translation as a fraction of the side (weak and strong views).
        hed_sigma: HED jitter scale strength (Tellez et al.: 0.05 light, 0.1 strong).
        hed_bias: HED jitter shift, in :mod:`histofm.data.stain` concentration units.
        brightness, contrast, saturation: multiplicative factors drawn in ``1 +- value``.
        blur_prob: probability of a Gaussian blur; ``blur_sigma`` bounds its sigma in pixels.
        cutout: side of the Cutout square as a fraction of the image side; off by default
            because on nucleus-centred crops it can erase the very object that sets the label.
    """

    flip_rot: bool = True
    shift: float = 0.125
    hed_sigma: float = 0.05
    hed_bias: float = 0.01
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    cutout: float = 0.0


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def flip_rot90(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Apply one of the 8 dihedral symmetries of the square, chosen per sample."""
    b = x.shape[0]
    k = torch.randint(0, 4, (b,), generator=g, device=x.device)
    flip = torch.rand(b, generator=g, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    out = x.clone()
    for r in range(1, 4):  # 4 masked rotations of the whole batch: cheap, no per-image loop
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


def random_shift(x: torch.Tensor, max_frac: float, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_frac`` of its side (integer pixels, reflected border)."""
    if max_frac <= 0:
        return x
    b, _, h, w = x.shape
    ph, pw = max(1, int(round(h * max_frac))), max(1, int(round(w * max_frac)))
    padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    dy = torch.randint(0, 2 * ph + 1, (b,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pw + 1, (b,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # (B, W)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def hed_jitter(x: torch.Tensor, sigma: float, bias: float, g: torch.Generator) -> torch.Tensor:
    """Tellez HED stain augmentation: scale and shift each stain's concentration per image.

    The stain matrices and units are :mod:`histofm.data.stain`'s (scikit-image's),
    but concentrations are *not* clipped at zero here, so the round trip is exact
    and ``sigma = bias = 0`` is the identity (``rgb_to_hed``'s clipping changes real
    H&E pixels by up to ~0.37 even without jitter). Draws come from ``g``.
    """
    if sigma <= 0 and bias <= 0:
        return x
    b, dev = x.shape[0], x.device
    alpha = _uniform(b * 3, 1 - sigma, 1 + sigma, g, dev).view(b, 3, 1, 1)
    beta = _uniform(b * 3, -bias, bias, g, dev).view(b, 3, 1, 1)
    od = x.float().clamp_min(1e-6).log() / _LOG_ADJUST  # (B, 3, H, W)
    hed = torch.einsum("bchw,cs->bshw", od, HED_FROM_RGB.to(dev, torch.float32))  # (B, 3 stains, H, W)
    hed = hed * alpha + beta
    od = torch.einsum("bshw,sc->bchw", hed, RGB_FROM_HED.to(dev, torch.float32))
    return (od * _LOG_ADJUST).exp().clamp(0, 1).to(x.dtype)


def colour_jitter(
    x: torch.Tensor, brightness: float, contrast: float, saturation: float, g: torch.Generator
) -> torch.Tensor:
    """Mild brightness, contrast and saturation factors per image; the hue is never touched."""
    b, dev = x.shape[0], x.device
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W)
    if saturation > 0:
        s = _uniform(b, 1 - saturation, 1 + saturation, g, dev).view(b, 1, 1, 1)
        x = gray + s * (x - gray)
    if contrast > 0:
        c = _uniform(b, 1 - contrast, 1 + contrast, g, dev).view(b, 1, 1, 1)
        mean = gray.mean(dim=(2, 3), keepdim=True)
        x = mean + c * (x - mean)
    if brightness > 0:
        x = x * _uniform(b, 1 - brightness, 1 + brightness, g, dev).view(b, 1, 1, 1)
    return x.clamp(0, 1)


def gaussian_blur(
    x: torch.Tensor, prob: float, sigma: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """Blur a random subset of the batch, each image with its own sigma (one grouped conv)."""
    b, c, h, w = x.shape
    dev = x.device
    apply = torch.rand(b, generator=g, device=dev) < prob
    if prob <= 0 or not apply.any():
        return x
    sig = _uniform(b, sigma[0], sigma[1], g, dev).to(x.dtype)  # (B,)
    radius = max(1, int(round(2 * sigma[1])))
    t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sig[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K)
    k = k.repeat_interleave(c, 0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)  # horizontal
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)  # vertical
    y = y.reshape(b, c, h, w)
    return torch.where(apply[:, None, None, None], y, x)


def cutout(x: torch.Tensor, frac: float, g: torch.Generator) -> torch.Tensor:
    """Fill one square of side ``frac * H`` per image with the image's mean colour."""
    if frac <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    side = max(1, int(round(frac * min(h, w))))
    cy = torch.randint(0, h, (b,), generator=g, device=dev)
    cx = torch.randint(0, w, (b,), generator=g, device=dev)
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    inside = ((ys - cy[:, None, None]).abs() <= side // 2) & ((xs - cx[:, None, None]).abs() <= side // 2)
    fill = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return torch.where(inside[:, None], fill, x)


def weak_view(x: torch.Tensor, cfg: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Flip/rotate and shift: the view that makes the pseudo-label."""
    if cfg.flip_rot:
        x = flip_rot90(x, g)
    return random_shift(x, cfg.shift, g)


def strong_view(x: torch.Tensor, cfg: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Weak geometry plus HED stain jitter, mild colour jitter, blur and (optionally) Cutout."""
    x = weak_view(x, cfg, g)
    x = hed_jitter(x, cfg.hed_sigma, cfg.hed_bias, g)
    x = colour_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, g)
    x = gaussian_blur(x, cfg.blur_prob, cfg.blur_sigma, g)
    return cutout(x, cfg.cutout, g)
