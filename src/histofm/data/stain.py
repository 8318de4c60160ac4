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

Stain shift for evaluation (:func:`hed_shift`, :data:`STAIN_SHIFTS`,
:func:`apply_stain_shift`): deterministic re-stainings of *test* images only, to
measure how much of a frozen encoder's accuracy survives a change of lab. Stain
normalisation (Macenko, Reinhard, Vahadane) lives in :mod:`histofm.data.stain_norm`
and is re-exported here: ``histofm.data.stain.normalizer(name)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from histofm.data.stain_norm import (  # noqa: F401  (re-exported: the public stain API is this module)
    NORMALIZERS,
    MacenkoNormalizer,
    ReinhardNormalizer,
    StainNormalize,
    VahadaneNormalizer,
    make_stain_transform,
    normalizer,
    read_target,
)
from histofm.errors import HistofmError

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


def unmix_unclamped(rgb: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in ``[0, 1]`` to *unclamped* H, E, DAB concentrations ``(B, 3, H, W)``.

    Unlike :func:`rgb_to_hed` nothing is clamped, so mixing back with the same matrix is the identity.
    """
    od = rgb.clamp_min(1e-6).log() / _LOG_ADJUST  # optical density, scaled
    return torch.einsum("bchw,cs->bshw", od, HED_FROM_RGB.to(od))


def _shift_hed(rgb: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``c' = alpha * c + beta`` per stain of RGB ``(B, 3, H, W)`` in ``[0, 1]``; ``alpha``, ``beta`` ``(B, 3)``.

    The deconvolution is not clamped (unlike :func:`rgb_to_hed`), so ``alpha = 1, beta = 0`` is
    the identity; a negative ``beta`` removes stain but never below none, so it cannot turn a
    stain's colour into its complement (cyan backgrounds).
    """
    hed = unmix_unclamped(rgb)  # (B, 3, H, W)
    scaled = hed * alpha.to(hed)[:, :, None, None]
    return hed_to_rgb(scaled + torch.maximum(beta.to(hed)[:, :, None, None], -scaled.clamp_min(0)))


class HEDJitter(nn.Module):
    """Random per-stain scale and shift in HED space (Tellez et al. 2018).

    Args:
        sigma: the scale ``alpha`` is drawn from ``U(1 - sigma, 1 + sigma)`` per stain.
        bias: the shift ``beta`` is drawn from ``U(-bias, bias)`` per stain (in concentration units;
            typical H&E concentrations are 0.0-0.15).
        p: probability of applying the jitter to an image.

    Works on float images in ``[0, 1]`` ``(3, H, W)`` or ``(B, 3, H, W)`` (each image gets its own
    draw) and on uint8 images (converted and returned as uint8). The identity draw is exact,
    and a negative bias stops at zero stain (see :func:`hed_shift`).
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.01, p: float = 1.0) -> None:
        super().__init__()
        self.sigma, self.bias, self.p = sigma, bias, p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor) or img.ndim not in (3, 4) or img.shape[-3] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise HistofmError(f"HEDJitter takes (3, H, W) or (B, 3, H, W) tensors, got {shape}; put it after "
                               "ToImage() in the pipeline.")
        is_uint8 = img.dtype == torch.uint8
        # Checked on CPU only: on a GPU (the batch augmentation) it would stall every step for a sync.
        if (not is_uint8 and img.device.type == "cpu" and img.numel()
                and not (float(img.min()) >= -1e-3 and float(img.max()) <= 1 + 1e-3)):
            raise HistofmError("HEDJitter takes uint8 images or floats in [0, 1]; put it before Normalize, and "
                               "divide 0-255 floats by 255.")
        x = img.float() / 255 if is_uint8 else img
        batched = x.ndim == 4
        xb = x if batched else x[None]
        n = xb.shape[0]
        apply = torch.rand(n) < self.p  # (B,)
        if not apply.any():
            return img
        alpha = 1 + (torch.rand(n, 3) * 2 - 1) * self.sigma  # (B, 3)
        beta = (torch.rand(n, 3) * 2 - 1) * self.bias  # (B, 3)
        out = _shift_hed(xb.double(), alpha, beta).to(xb.dtype)
        out = torch.where(apply[:, None, None, None], out, xb)
        out = out if batched else out[0]
        return (out * 255).round().clamp(0, 255).to(torch.uint8) if is_uint8 else out

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, bias={self.bias}, p={self.p}"


# ------------------------------------------------------------------ deterministic stain shifts (evaluation)
def hed_shift(
    images: Any,  # noqa: ANN401
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0),
    jitter_sigma: float = 0.0,
    jitter_bias: float = 0.0,
    seed: int = 0,
) -> Any:  # noqa: ANN401
    """Shift the stain of uint8 RGB images in HED space: ``c' = (scale * a) * c + (bias + b)`` per stain.

    ``scale`` and ``bias`` are the same for every image (one lab's different staining);
    ``a ~ U(1 - jitter_sigma, 1 + jitter_sigma)`` and ``b ~ U(-jitter_bias, jitter_bias)`` are
    drawn per image from ``seed``, so the result is deterministic. Typical H&E concentrations
    are 0.0-0.2 (99th percentile of the bundled HGSC field), so a bias of 0.02 is large. A
    negative bias stops at zero stain (it never turns a stain into its complementary colour).

    Args:
        images: ``(H, W, 3)`` or ``(N, H, W, 3)`` uint8, numpy or torch; the output has the same form.
    """
    from histofm.data.stain_norm import _as_batch

    x, restore = _as_batch(images, "A stain shift")  # (B, H, W, 3) in [0, 255]
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    a = 1 + (torch.rand(n, 3, generator=gen, dtype=torch.float64) * 2 - 1) * jitter_sigma  # (B, 3)
    b = (torch.rand(n, 3, generator=gen, dtype=torch.float64) * 2 - 1) * jitter_bias
    alpha = a * torch.tensor(scale, dtype=torch.float64)
    beta = b + torch.tensor(bias, dtype=torch.float64)
    out = _shift_hed(x.double().permute(0, 3, 1, 2) / 255, alpha, beta).permute(0, 2, 3, 1) * 255
    return restore(out.float())


@dataclass(frozen=True)
class StainShift:
    """A named, deterministic stain shift of test images (see :data:`STAIN_SHIFTS`).

    Attributes:
        name: the key in :data:`STAIN_SHIFTS` (what ``--stain-shift`` takes).
        description: one line for tables and docs.
        scale, bias, jitter_sigma, jitter_bias, seed: arguments of :func:`hed_shift`.
        target: for a Macenko re-staining, the bundled H&E sample whose stain the images take.
    """

    name: str
    description: str
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    jitter_sigma: float = 0.0
    jitter_bias: float = 0.0
    seed: int = 0
    target: str | None = None


#: Named stain shifts. ``macenko:cmu`` re-stains to the bundled CMU-1 skin slide: another lab,
#: another tissue and an Aperio scanner, so a real second H&E source. ``macenko:hgsc_stroma``
#: re-stains to the stroma field of the test crops' own dataset; Macenko still moves the colours
#: a lot (mean |change| 29 grey levels vs 25 for CMU), because it rescales each stain's concentration.
STAIN_SHIFTS: dict[str, StainShift] = {s.name: s for s in (
    StainShift("hed-scale", "HED scale H x0.7, E x1.3 (paler nuclei, stronger eosin)", scale=(0.7, 1.3, 1.0)),
    StainShift("hed-bias", "HED bias H +0.03, E -0.02 (bluish background, weaker eosin)", bias=(0.03, -0.02, 0.0)),
    StainShift("hed-random", "per-crop HED scale U(0.7, 1.3) and bias U(-0.02, 0.02), seed 0",
               jitter_sigma=0.3, jitter_bias=0.02, seed=0),
    StainShift("macenko:cmu", "Macenko re-staining to the CMU-1 skin slide (another lab and scanner)",
               target="cmu_small_region"),
    StainShift("macenko:hgsc_stroma", "Macenko re-staining to the HGSC stroma field (same dataset, another field)",
               target="hgsc_stroma"),
)}

#: The shifts that ``histofm eval nuclei`` and the demo report by default.
DEFAULT_SHIFTS = ("hed-scale", "hed-bias", "hed-random", "macenko:cmu")


@functools.lru_cache(maxsize=4)
def _fitted_macenko(sample: str) -> MacenkoNormalizer:
    """A Macenko normaliser fitted on a bundled sample (every fourth pixel of every fourth row; cached per process)."""
    from histofm.data.datasets import _load_sample

    norm = MacenkoNormalizer()
    norm.fit(_load_sample(sample)[::4, ::4])
    return norm


def stain_shift(name: str | StainShift) -> StainShift:
    """Look up a named shift; a bad name raises a one-sentence error naming ``--stain-shift``."""
    if isinstance(name, StainShift):
        return name
    shift = STAIN_SHIFTS.get(name)
    if shift is None:
        raise HistofmError(f"Unknown stain shift {name!r}; choose from {', '.join(STAIN_SHIFTS)} (--stain-shift).")
    return shift


def parse_stain_shifts(text: str) -> list[str]:
    """The names of a ``--stain-shift`` value: comma-separated, each once, or ``none`` for none.

    An empty list, ``none`` among other names or an unknown name raises a one-sentence error.
    """
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))  # each once, in order
    if [name.lower() for name in names] == ["none"]:
        return []
    if not names:
        raise HistofmError(f"--stain-shift {text!r} names no shift; pass names such as {DEFAULT_SHIFTS[0]}, "
                           "or 'none' for the clean column only.")
    if "none" in (name.lower() for name in names):
        raise HistofmError("--stain-shift 'none' stands alone (the clean column only); drop it, or drop the other names.")
    for name in names:
        stain_shift(name)  # an unknown name fails here, naming --stain-shift
    return names


def apply_stain_shift(images: Any, name: str | StainShift) -> Any:  # noqa: ANN401
    """Apply a named stain shift to uint8 RGB images ``(N, H, W, 3)`` (or one ``(H, W, 3)``); same form out.

    A Macenko re-staining estimates the images' stains once over the whole batch (they come
    from one field), so every crop gets the same mapping, as a re-stained slide would.
    """
    shift = stain_shift(name)
    if shift.target is not None:
        return _fitted_macenko(shift.target).transform(images, per_image=False)
    return hed_shift(images, shift.scale, shift.bias, shift.jitter_sigma, shift.jitter_bias, shift.seed)
