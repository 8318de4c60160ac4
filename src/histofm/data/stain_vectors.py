"""Stain-vector jitter: a random change of the stains' *colours*, not only of their amounts.

:class:`histofm.data.stain.HEDJitter` (Tellez et al. 2018) scales and shifts the
haematoxylin and eosin concentrations along fixed stain colours (Ruifrok &
Johnston's optical-density vectors). Another lab's H&E differs also in the
colours themselves: the Macenko stain vectors of the bundled HGSC fields lie
4-13 degrees (haematoxylin) and 8-25 degrees (eosin) from each other, from
Ruifrok's vectors and from Macenko's reference slide. A concentration jitter
cannot produce such a change; this one can.

For each image, the RGB pixels are unmixed into stain concentrations with the
Ruifrok matrix (unclamped, as in ``HEDJitter``, so no draw loses information) and
mixed back with a perturbed matrix whose haematoxylin and eosin rows are

    v' = |v| * normalise(max(v / |v| + sigma * n, 0)),   n ~ N(0, I_3)

(a random tilt of each stain's optical-density direction, about
``atan(sigma * sqrt(2))`` on average: 12 degrees for ``sigma = 0.15``; the DAB
row, the residual channel of H&E, is kept). ``sigma = 0`` is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from histofm.data.stain import _LOG_ADJUST, RGB_FROM_HED, unmix_unclamped


def perturb_stain_vectors(rgb: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Re-colour RGB ``(B, 3, H, W)`` in ``[0, 1]`` with tilted H and E vectors; ``noise`` ``(B, 2, 3)``.

    ``noise`` is added to the unit H and E optical-density vectors (see the module docstring).
    """
    x = rgb.double()
    conc = unmix_unclamped(x)  # (B, 3, H, W)
    base = RGB_FROM_HED.to(conc)  # (3 stains, 3 channels)
    norm = base[:2].norm(dim=1, keepdim=True)  # (2, 1)
    tilted = (base[:2] / norm + noise.to(conc)).clamp_min(0)  # (B, 2, 3)
    tilted = tilted / tilted.norm(dim=-1, keepdim=True).clamp_min(1e-8) * norm
    mix = torch.cat([tilted, base[2:].expand(len(x), 1, 3)], dim=1)  # (B, 3, 3)
    log_rgb = torch.einsum("bshw,bsc->bchw", conc * _LOG_ADJUST, mix)
    return log_rgb.exp().clamp(0, 1).to(rgb.dtype)


class StainVectorJitter(nn.Module):
    """Random tilt of the haematoxylin and eosin colours (see the module docstring).

    Args:
        sigma: standard deviation of the Gaussian tilt of each unit stain vector.
        p: probability of applying the jitter to an image.

    Works on float images in ``[0, 1]``, ``(3, H, W)`` or ``(B, 3, H, W)`` (each image gets its own draw).
    """

    def __init__(self, sigma: float = 0.15, p: float = 1.0) -> None:
        super().__init__()
        self.sigma, self.p = sigma, p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        batched = img.ndim == 4
        x = img if batched else img[None]
        apply = torch.rand(len(x)) < self.p  # (B,)
        if not apply.any() or self.sigma == 0:
            return img
        noise = torch.randn(len(x), 2, 3, dtype=torch.float64) * self.sigma  # (B, 2, 3)
        out = torch.where(apply[:, None, None, None], perturb_stain_vectors(x, noise), x)
        return out if batched else out[0]

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, p={self.p}"
