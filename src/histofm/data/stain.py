"""Colour deconvolution into haematoxylin, eosin and DAB (HED), and HED stain augmentation.

Colour deconvolution (Ruifrok & Johnston 2001, "Quantification of histochemical
staining by color deconvolution", Anal. Quant. Cytol. Histol. 23(4)) rests on the
Beer-Lambert law: the optical density ``OD = -log(I / I_0)`` of a pixel is a
linear mix of the stains' optical-density vectors. With the stain vectors as the
rows of ``M`` (``rgb_from_hed``; haematoxylin, eosin, DAB)::

    OD_rgb = c_hed @ M          ->     c_hed = OD_rgb @ M^{-1}

We follow scikit-image's ``rgb2hed``/``hed2rgb`` conventions exactly (its tests are
our oracle): intensities are clipped below at 1e-6 and optical densities are
expressed in units of ``-log(1e-6)``, concentrations are clipped at 0.

HED jitter (Tellez et al. 2018, arXiv 1808.05896; compared with other colour
augmentations in Tellez et al. 2019, arXiv 1902.06543) perturbs each stain's
concentration independently, ``c'_s = alpha_s * c_s + beta_s`` with
``alpha_s ~ U(1 - sigma, 1 + sigma)`` and ``beta_s ~ U(-bias, bias)``, and maps back
to RGB: a realistic imitation of lab-to-lab staining differences.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Stain optical-density vectors (rows): haematoxylin, eosin, DAB (Ruifrok & Johnston 2001).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = math.log(1e-6)  # optical densities are expressed in units of -log(1e-6)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in ``[0, 1]`` ``(..., 3, H, W)`` to stain concentrations ``(..., 3, H, W)`` (H, E, DAB).

    Matches ``skimage.color.rgb2hed`` (which works channels-last).
    """
    x = rgb.clamp_min(1e-6).log() / _LOG_ADJUST  # (..., 3, H, W) optical density, scaled
    m = HED_FROM_RGB.to(device=rgb.device, dtype=x.dtype)
    hed = torch.einsum("...chw,cs->...shw", x, m)
    return hed.clamp_min(0)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Stain concentrations ``(..., 3, H, W)`` back to RGB in ``[0, 1]``; matches ``skimage.color.hed2rgb``."""
    m = RGB_FROM_HED.to(device=hed.device, dtype=hed.dtype)
    log_rgb = torch.einsum("...shw,sc->...chw", hed * _LOG_ADJUST, m)
    return log_rgb.exp().clamp(0, 1)


class HEDJitter(nn.Module):
    """Random per-stain scale and shift in HED space (Tellez et al. 2018).

    Args:
        sigma: the scale ``alpha`` is drawn from ``U(1 - sigma, 1 + sigma)`` per stain.
        bias: the shift ``beta`` is drawn from ``U(-bias, bias)`` per stain (in concentration units;
            typical H&E concentrations are 0.0-0.15).
        p: probability of applying the jitter to an image.

    Works on float images in ``[0, 1]`` ``(3, H, W)`` or ``(B, 3, H, W)`` (each image gets its own
    draw) and on uint8 images (converted and returned as uint8).
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.01, p: float = 1.0) -> None:
        super().__init__()
        self.sigma, self.bias, self.p = sigma, bias, p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor):
            raise TypeError("HEDJitter expects a tensor image; put it after ToImage()/ToDtype in the pipeline")
        is_uint8 = img.dtype == torch.uint8
        x = img.float() / 255 if is_uint8 else img
        batched = x.ndim == 4
        xb = x if batched else x[None]
        n = xb.shape[0]
        apply = torch.rand(n) < self.p  # (B,)
        if not apply.any():
            return img
        alpha = 1 + (torch.rand(n, 3) * 2 - 1) * self.sigma  # (B, 3)
        beta = (torch.rand(n, 3) * 2 - 1) * self.bias  # (B, 3)
        hed = rgb_to_hed(xb.double())
        jittered = hed * alpha.double()[:, :, None, None] + beta.double()[:, :, None, None]
        out = hed_to_rgb(jittered).to(xb.dtype)
        out = torch.where(apply[:, None, None, None], out, xb)
        out = out if batched else out[0]
        return (out * 255).round().clamp(0, 255).to(torch.uint8) if is_uint8 else out

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, bias={self.bias}, p={self.p}"
