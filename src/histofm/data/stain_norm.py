"""Stain normalisation in torch, batched and device-following: Macenko, Reinhard and Vahadane.

All three map a *source* image onto the colour appearance of a *target* image
(``.fit(target)`` then ``.transform(image)``). Images are RGB uint8, as numpy arrays
or torch tensors, one ``(H, W, 3)`` or a batch ``(B, H, W, 3)``; the output has the
type, layout and device of the input. Each image of a batch is normalised on its own
statistics, or all together with ``transform(batch, per_image=False)`` (one stain
estimate for the whole batch: a consistent re-staining of many crops of one slide).

* **Macenko** (Macenko et al. 2009, "A method for normalizing histology slides for
  quantitative analysis", ISBI): optical densities ``OD = -log((I + 1) / I_0)`` of
  tissue pixels (every channel's OD >= ``beta``) span a plane; its two stain vectors
  are the directions at the ``alpha`` and ``100 - alpha`` percentiles of the angle
  within the plane of the two leading eigenvectors of the OD covariance.
  Concentrations are the least-squares solution, scaled so their 99th percentile
  matches the target's, and re-mixed with the target's stain vectors.
* **Reinhard** (Reinhard et al. 2001, "Color transfer between images", IEEE CG&A):
  match each CIE-Lab channel's mean and standard deviation to the target's.
* **Vahadane** (Vahadane et al. 2016, "Structure-preserving color normalization
  and sparse stain separation", IEEE TMI 35(8)): the stain matrix is learned by
  sparse non-negative matrix factorisation ``OD ~ C W`` (``C >= 0`` with an L1
  penalty, ``W >= 0`` with unit rows) of tissue pixels; concentrations are the exact
  non-negative lasso solution per pixel, then scaled and re-mixed as in Macenko.
  Our solver alternates the exact codes with block-coordinate stain updates
  (Mairal et al. 2010), started from the Ruifrok H and E vectors. SPAMS (the
  paper's and staintools' solver; ``spams-bin`` is a dev dependency) is the oracle
  of the tests: same objective, stain vectors and codes compared on real tiles.

Conventions follow torchstain (its tests are our oracle for Macenko and Reinhard):
``I_0 = 240``, ``alpha = 1``, ``beta = 0.15``, nearest-rank percentiles
``k = 1 + round(q / 100 * (n - 1))``, sRGB/D65 Lab. We round to uint8 where
torchstain truncates, so outputs differ by at most about one grey level.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histofm.errors import HistofmError

Image = Any  # np.ndarray | torch.Tensor, uint8 (H, W, 3) or (B, H, W, 3)

# Reference stain vectors (columns: haematoxylin, eosin) and 99th-percentile concentrations of the
# Macenko paper's reference image, as used by its public implementations (and torchstain).
MACENKO_HE_REF = torch.tensor([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MACENKO_MAXC_REF = torch.tensor([1.9705, 1.0308])
# Ruifrok & Johnston haematoxylin and eosin OD vectors (unit rows): Vahadane's starting dictionary.
_RUIFROK_HE = torch.nn.functional.normalize(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]), dim=1)


# ------------------------------------------------------------------ layouts
def _as_batch(image: Image, what: str = "Stain normalisation") -> tuple[torch.Tensor, Callable[[torch.Tensor], Image]]:
    """``(B, H, W, 3)`` float32 in ``[0, 255]`` and a function that gives the result back in the input's form."""
    is_numpy = isinstance(image, np.ndarray)
    normalising = what == "Stain normalisation"  # only normalisers have a channels-first, float wrapper
    if not is_numpy and not isinstance(image, torch.Tensor):
        raise HistofmError(f"{what} takes a numpy array or torch tensor, got {type(image).__name__}.")
    if image.dtype not in (np.uint8, torch.uint8):
        raise HistofmError(f"{what} takes uint8 RGB images, got dtype {image.dtype}; convert with "
                           "(x * 255).round().astype('uint8')"
                           f"{' or use StainNormalize for float tensors' if normalising else ''}.")
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise HistofmError(f"{what} takes RGB images (H, W, 3) or (B, H, W, 3), got shape {tuple(image.shape)}"
                           f"{'; channels-first tensors go through StainNormalize' if normalising else ''}.")
    if 0 in image.shape[-3:-1]:
        raise HistofmError(f"{what} got an empty image of shape {tuple(image.shape)}; pass images "
                           "with at least one pixel.")
    single = image.ndim == 3
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])) if is_numpy else image
    x = t.float()
    x = x[None] if single else x

    def restore(out: torch.Tensor) -> Image:
        out = out.round().clamp(0, 255).to(torch.uint8)
        out = out[0] if single else out
        return out.cpu().numpy() if is_numpy else out

    return x, restore


def _percentile(x: torch.Tensor, q: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-rank percentile over the last dim (torchstain's convention): ``(B, N) -> (B,)``.

    With ``valid`` (``(B, N)`` bool) only valid entries count; each row needs at least one.
    """
    if valid is None:
        n = torch.full(x.shape[:-1], x.shape[-1], device=x.device, dtype=torch.float64)
        values = x
    else:
        n = valid.sum(-1).double()
        values = torch.where(valid, x, torch.full_like(x, float("inf")))
    k = torch.round(0.01 * q * (n - 1)).long().clamp_min(0)  # zero-based rank
    return values.sort(-1).values.gather(-1, k[..., None])[..., 0]


def _optical_density(x: torch.Tensor, io: float) -> torch.Tensor:
    """``(B, N, 3)`` intensities in ``[0, 255]`` to optical densities ``-log((I + 1) / I_0)``."""
    return -torch.log((x + 1) / io)


def _tissue_flags(od: torch.Tensor, beta: float, min_pixels: int) -> tuple[torch.Tensor, ...]:
    """Tissue pixels and their optical-density spread, shared by the three normalisers.

    Args:
        od: optical densities ``(B, N, 3)``.

    Returns:
        ``valid`` ``(B, N)`` (tissue pixels; every pixel of an image without enough tissue, so the
        maths stays finite for images that will pass through), ``tissue`` ``(B,)`` (at least
        ``min_pixels`` tissue pixels), ``colours`` ``(B,)`` (the tissue shows more than one colour:
        the second eigenvalue of the covariance is at least 1e-4 of the first; a grey, black or
        single-colour image has a rank-one or zero covariance and no stain plane), and the
        eigen-decomposition ``(values (B, 3) ascending, vectors (B, 3, 3))`` of that covariance.
    """
    valid = (od >= beta).all(-1)  # (B, N) torchstain drops pixels with any channel below beta
    tissue = valid.sum(1) >= min_pixels
    valid = valid | ~tissue[:, None]
    n = valid.sum(1).clamp_min(2)
    w = valid.to(od.dtype)[..., None]
    mean = (od * w).sum(1) / n[:, None]
    centred = (od - mean[:, None]) * w
    cov = centred.transpose(1, 2) @ centred / (n[:, None, None] - 1)  # (B, 3, 3)
    values, vectors = torch.linalg.eigh(cov)
    # Real H&E tiles measure 3e-3 or more (16-128 px crops of the bundled fields); grey images 1e-8.
    colours = values[:, 1] >= 1e-4 * values[:, 2].clamp_min(1e-12)
    return valid, tissue, tissue & colours, (values, vectors)


def _least_squares(od: torch.Tensor, he: torch.Tensor) -> torch.Tensor:
    """Concentrations ``(B, N, 2)`` minimising ``|od - C he^T|`` for stain vectors ``he`` ``(B, 3, 2)``."""
    # A tiny ridge keeps degenerate (tissue-free) images finite; they pass through unchanged later.
    gram = he.transpose(1, 2) @ he + 1e-6 * torch.eye(2, device=he.device, dtype=he.dtype)
    pinv = torch.linalg.solve(gram, he.transpose(1, 2))  # (B, 2, 3)
    return od @ pinv.transpose(1, 2)


class _StainNormalizer:
    """Shared fit/transform plumbing: subclasses estimate statistics and apply them."""

    name = ""

    def __init__(self) -> None:
        self.target: dict[str, torch.Tensor] | None = None

    def fit(self, target: Image) -> _StainNormalizer:
        """Estimate the target's statistics (a batch of targets is pooled into one estimate)."""
        x, _ = _as_batch(target)
        stats = self._stats(x.reshape(1, -1, 3))
        ok, tissue = stats.pop("ok"), stats.pop("tissue")
        if not bool(tissue[0]):
            raise HistofmError(f"The {self.name} target has too little stained tissue to estimate its stains; "
                               "choose a --stain-target with tissue.")
        if not bool(ok[0]):
            raise HistofmError(f"The {self.name} target's tissue shows a single colour (a grey, black or one-stain "
                               "image), so it has no stain to match; choose an H&E --stain-target with both stains.")
        self.target = {k: v[0] for k, v in stats.items()}
        return self

    def transform(self, image: Image, per_image: bool = True) -> Image:
        """Normalise ``image`` onto the fitted target; same type, layout and device out as in.

        Args:
            image: uint8 RGB ``(H, W, 3)`` or ``(B, H, W, 3)``, numpy or torch.
            per_image: estimate each image's own stains (default), or one estimate for the whole batch.
        """
        x, restore = _as_batch(image)
        b, h, w, _ = x.shape
        if b == 0:  # an empty batch: nothing to estimate
            return restore(x)
        flat = x.reshape(b, h * w, 3)
        stats = self._stats(flat if per_image else flat.reshape(1, -1, 3))
        stats.pop("tissue")
        if not per_image:
            stats = {k: v.expand(b, *v.shape[1:]) for k, v in stats.items()}
        target = {k: v.to(x.device) for k, v in self._target().items()}
        out = self._apply(flat, stats, target)  # (B, N, 3)
        ok = torch.isfinite(out).all(-1).all(-1) & stats["ok"]
        # Images without enough tissue, or whose tissue shows one colour only, pass through unchanged.
        out = torch.where(ok[:, None, None], out, flat)
        return restore(out.reshape(b, h, w, 3))

    def __call__(self, image: Image) -> Image:
        return self.transform(image)

    def _target(self) -> dict[str, torch.Tensor]:
        if self.target is None:
            raise HistofmError(f"The {self.name} normaliser has no target; call .fit(target_image) first "
                               "(or pass --stain-target IMAGE).")
        return self.target

    def _stats(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _apply(self, flat: torch.Tensor, stats: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------ Macenko
class MacenkoNormalizer(_StainNormalizer):
    """Macenko et al. 2009; unfitted, it maps onto the paper's reference stains.

    Args:
        io: transmitted light intensity ``I_0``.
        alpha: angle percentile of the extreme stain directions.
        beta: optical-density threshold of tissue pixels (every channel).
        min_pixels: images with fewer tissue pixels are returned unchanged.
    """

    name = "macenko"

    def __init__(self, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15, min_pixels: int = 16) -> None:
        super().__init__()
        self.io, self.alpha, self.beta, self.min_pixels = io, alpha, beta, min_pixels
        self.target = {"he": MACENKO_HE_REF.clone(), "max_c": MACENKO_MAXC_REF.clone()}

    def stain_vectors(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stain vectors ``(B, 3, 2)`` (columns H, E) and a ``(B,)`` flag of images whose stains can be estimated
        (enough tissue, more than one colour)."""
        he, ok, _ = self._stain_vectors(flat)
        return he, ok

    def _stain_vectors(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        od = _optical_density(flat, self.io)  # (B, N, 3)
        valid, tissue, ok, (_, vectors) = _tissue_flags(od, self.beta, self.min_pixels)
        eigvecs = vectors[..., 1:]  # (B, 3, 2) ascending eigenvalues: 2nd and 1st component
        t = od @ eigvecs  # (B, N, 2)
        phi = torch.atan2(t[..., 1], t[..., 0])
        lo = _percentile(phi, self.alpha, valid)
        hi = _percentile(phi, 100 - self.alpha, valid)
        v_lo = (eigvecs @ torch.stack([lo.cos(), lo.sin()], -1)[..., None])[..., 0]  # (B, 3)
        v_hi = (eigvecs @ torch.stack([hi.cos(), hi.sin()], -1)[..., None])[..., 0]
        # Haematoxylin first: the vector with the larger red optical density.
        first = (v_lo[:, :1] > v_hi[:, :1])
        h = torch.where(first, v_lo, v_hi)
        e = torch.where(first, v_hi, v_lo)
        return torch.stack([h, e], -1), ok, tissue

    def _stats(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        he, ok, tissue = self._stain_vectors(flat)
        c = _least_squares(_optical_density(flat, self.io), he)  # (B, N, 2)
        max_c = torch.stack([_percentile(c[..., 0], 99), _percentile(c[..., 1], 99)], -1)  # (B, 2)
        return {"he": he, "max_c": max_c, "ok": ok, "tissue": tissue}

    def _apply(self, flat: torch.Tensor, stats: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        c = _least_squares(_optical_density(flat, self.io), stats["he"])  # (B, N, 2)
        c = c * (target["max_c"] / stats["max_c"])[:, None]
        out = self.io * torch.exp(-c @ target["he"].T)  # (B, N, 3)
        return out.clamp_max(255)


# ------------------------------------------------------------------ Reinhard
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]])
_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in ``[0, 1]`` ``(..., 3)`` to CIE Lab (D65; L in 0..100) ``(..., 3)``."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ _XYZ_FROM_RGB.to(rgb).T / _D65.to(rgb)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65) ``(..., 3)`` back to sRGB in ``[0, 1]`` (clipped)."""
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([lab[..., 1] / 500 + fy, fy, fy - lab[..., 2] / 200], -1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _D65.to(lab)
    lin = xyz @ torch.linalg.inv(_XYZ_FROM_RGB).to(lab).T
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055, lin * 12.92)
    return rgb.clamp(0, 1)


class ReinhardNormalizer(_StainNormalizer):
    """Reinhard et al. 2001: per-channel Lab mean and standard deviation transfer (all pixels count).

    Args:
        io, beta, min_pixels: as for Macenko, only to decide which images pass through unchanged
            (fewer than ``min_pixels`` tissue pixels, or one colour only) and which targets to refuse.
    """

    name = "reinhard"

    def __init__(self, io: float = 240.0, beta: float = 0.15, min_pixels: int = 16) -> None:
        super().__init__()
        self.io, self.beta, self.min_pixels = io, beta, min_pixels

    def _stats(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        _, tissue, ok, _ = _tissue_flags(_optical_density(flat, self.io), self.beta, self.min_pixels)
        lab = rgb_to_lab(flat / 255)  # (B, N, 3)
        std = lab.std(1) if flat.shape[1] > 1 else torch.zeros_like(lab[:, 0])
        return {"mean": lab.mean(1), "std": std.clamp_min(1e-6), "ok": ok, "tissue": tissue}

    def _apply(self, flat: torch.Tensor, stats: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        lab = rgb_to_lab(flat / 255)
        lab = (lab - stats["mean"][:, None]) / stats["std"][:, None] * target["std"] + target["mean"]
        return lab_to_rgb(lab) * 255


# ------------------------------------------------------------------ Vahadane
def _nonneg_lasso_2(od: torch.Tensor, w: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact ``argmin_{c >= 0} |od - c W|^2 + lam * sum(c)`` for two unit-norm stains ``w`` ``(B, 2, 3)``.

    A convex quadratic in two variables: the optimum is the best feasible one of the
    four active sets (both stains, H only, E only, none). ``od`` ``(B, N, 3)`` -> ``(B, N, 2)``.
    """
    rhs = od @ w.transpose(1, 2) - lam / 2  # (B, N, 2)
    # (B, 2, 2); the ridge keeps a degenerate (tissue-free) W finite. The Gram matrix is symmetric.
    gram = w @ w.transpose(1, 2) + 1e-6 * torch.eye(2, device=w.device, dtype=w.dtype)
    both = rhs @ torch.linalg.inv(gram).transpose(1, 2)
    zeros = torch.zeros_like(rhs[..., :1])
    h_only = torch.cat([rhs[..., :1].clamp_min(0), zeros], -1)  # unit rows: |w_h|^2 = 1
    e_only = torch.cat([zeros, rhs[..., 1:].clamp_min(0)], -1)
    cands = torch.stack([both, h_only, e_only], 2)  # (B, N, 3, 2)
    recon = cands @ w[:, None]  # (B, N, 3, 3)
    cost = ((od[:, :, None] - recon) ** 2).sum(-1) + lam * cands.sum(-1)  # (B, N, 3)
    cost = cost.masked_fill((cands < 0).any(-1), float("inf"))
    best = cost.argmin(-1)  # h_only / e_only are always feasible
    return cands.gather(2, best[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]


class VahadaneNormalizer(_StainNormalizer):
    """Vahadane et al. 2016 with our own sparse-NMF solver (unverified against a reference).

    Args:
        io: transmitted light intensity ``I_0``.
        beta: optical-density threshold of tissue pixels (every channel).
        lam_dict: L1 weight of the concentrations while learning the stain matrix (our objective is
            ``|od - c W|^2 + lam * sum(c)``; SPAMS halves the squared error, so its ``lambda1`` is
            ``lam / 2``: the defaults are staintools' 0.1 and 0.01).
        lam_conc: L1 weight when solving each pixel's concentrations.
        iters: alternations (sparse codes, then stains) of the dictionary learning.
        max_pixels: tissue pixels sampled per image for the dictionary (fixed seed).
        min_pixels: images with fewer tissue pixels are returned unchanged.
    """

    name = "vahadane"

    def __init__(self, io: float = 240.0, beta: float = 0.15, lam_dict: float = 0.2, lam_conc: float = 0.02,
                 iters: int = 30, max_pixels: int = 20000, min_pixels: int = 16) -> None:
        super().__init__()
        self.io, self.beta, self.lam_dict, self.lam_conc = io, beta, lam_dict, lam_conc
        self.iters, self.max_pixels, self.min_pixels = iters, max_pixels, min_pixels
        self.target = {"he": MACENKO_HE_REF.clone(), "max_c": MACENKO_MAXC_REF.clone()}

    def stain_matrix(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stain matrix ``(B, 2, 3)`` (unit rows H, E; non-negative) and a ``(B,)`` flag of images with tissue."""
        w, ok, _ = self._stain_matrix(flat)
        return w, ok

    def _stain_matrix(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        od = _optical_density(flat, self.io).clamp_min(0)  # (B, N, 3)
        valid = (od >= self.beta).all(-1)
        _, tissue, ok, _ = _tissue_flags(od, self.beta, self.min_pixels)
        b, n, _ = od.shape
        if n > self.max_pixels:  # a fixed random subset of pixels, the same for every call
            gen = torch.Generator().manual_seed(0)
            idx = torch.randperm(n, generator=gen)[: self.max_pixels].to(od.device)
            od, valid = od[:, idx], valid[:, idx]
        v = od * valid[..., None]  # (B, M, 3) non-tissue rows are zero and stay out of the fit
        w = _RUIFROK_HE.to(od).expand(b, 2, 3).clone()
        for _ in range(self.iters):
            # Alternate the exact sparse codes with one block-coordinate pass over the stains
            # (the dictionary update of Mairal et al. 2010, JMLR 11, in batch form).
            c = _nonneg_lasso_2(v, w, self.lam_dict) * valid[..., None]  # (B, M, 2)
            a = c.transpose(1, 2) @ c  # (B, 2, 2)
            bmat = c.transpose(1, 2) @ v  # (B, 2, 3)
            for j in range(2):
                step = (bmat[:, j] - (a[:, j, :, None] * w).sum(1)) / a[:, j, j, None].clamp_min(1e-9)
                wj = (w[:, j] + step).clamp_min(0)
                wj = wj / wj.norm(dim=1, keepdim=True).clamp_min(1.0)  # ||w_j|| <= 1
                w = torch.stack([wj, w[:, 1]], 1) if j == 0 else torch.stack([w[:, 0], wj], 1)
        w = torch.nn.functional.normalize(w, dim=2, eps=1e-9)
        swap = w[:, 0, 0] < w[:, 1, 0]  # haematoxylin first: larger red optical density
        w = torch.where(swap[:, None, None], w.flip(1), w)
        return w, ok, tissue

    def _stats(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        w, ok, tissue = self._stain_matrix(flat)
        c = _nonneg_lasso_2(_optical_density(flat, self.io).clamp_min(0), w, self.lam_conc)
        max_c = torch.stack([_percentile(c[..., 0], 99), _percentile(c[..., 1], 99)], -1).clamp_min(1e-6)
        return {"he": w.transpose(1, 2), "max_c": max_c, "ok": ok, "tissue": tissue}

    def _apply(self, flat: torch.Tensor, stats: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        od = _optical_density(flat, self.io).clamp_min(0)
        c = _nonneg_lasso_2(od, stats["he"].transpose(1, 2), self.lam_conc)
        c = c * (target["max_c"] / stats["max_c"])[:, None]
        return (self.io * torch.exp(-c @ target["he"].T)).clamp_max(255)


# ------------------------------------------------------------------ API
NORMALIZERS: dict[str, type[_StainNormalizer]] = {
    "macenko": MacenkoNormalizer, "reinhard": ReinhardNormalizer, "vahadane": VahadaneNormalizer,
}


def normalizer(name: str, **kwargs: Any) -> _StainNormalizer:  # noqa: ANN401
    """A stain normaliser by name (``macenko``, ``reinhard``, ``vahadane``); then ``.fit(target)``."""
    cls = NORMALIZERS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise HistofmError(f"Unknown stain normaliser {name!r}; choose one of {', '.join(NORMALIZERS)} (--stain-norm).")
    allowed = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise HistofmError(f"The {cls.name} normaliser has no setting {', '.join(unknown)}; it takes "
                           f"{', '.join(allowed)}.")
    return cls(**kwargs)


class StainNormalize(nn.Module):
    """A torchvision-style transform: stain-normalise channels-first tensors onto a fitted target.

    Takes ``(3, H, W)`` or ``(B, 3, H, W)``, uint8 or float in ``[0, 1]``, and returns the
    same shape, dtype and device (float outputs are quantised to 256 levels on the way).
    """

    def __init__(self, norm: _StainNormalizer, per_image: bool = True) -> None:
        super().__init__()
        self.norm, self.per_image = norm, per_image

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor) or img.ndim not in (3, 4) or img.shape[-3] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise HistofmError(f"StainNormalize takes (3, H, W) or (B, 3, H, W) tensors, got {shape}; "
                               "put it after ToImage() in the pipeline.")
        is_uint8 = img.dtype == torch.uint8
        if not is_uint8 and not img.is_floating_point():
            raise HistofmError(f"StainNormalize takes uint8 or float images, got dtype {img.dtype}.")
        if not is_uint8 and img.numel():
            lo, hi = float(img.min()), float(img.max())
            if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # NaN fails too
                raise HistofmError(f"StainNormalize takes float images in [0, 1], got values from {lo:.3g} to {hi:.3g}; "
                                   "put it before Normalize, and divide 0-255 floats by 255 (or pass uint8).")
        x = img if is_uint8 else (img * 255).round().clamp(0, 255).to(torch.uint8)
        out = self.norm.transform(x.movedim(-3, -1), per_image=self.per_image).movedim(-1, -3)
        return out if is_uint8 else (out.to(img.dtype) / 255)

    def extra_repr(self) -> str:
        return f"{self.norm.name}, per_image={self.per_image}"


def _target_file(path: str | Path) -> Path:
    """The file of a stain target: a path, or a bundled sample name; refuses folders and missing files."""
    from histofm.data import SAMPLES, sample_path

    p = sample_path(str(path)) if str(path) in SAMPLES else Path(path)
    if p.is_dir():
        raise HistofmError(f"The stain target {p} is a folder; pass one image file to --stain-target.")
    if not p.is_file():
        raise HistofmError(f"Stain target image not found: {p}; pass an existing file to --stain-target.")
    return p


def read_target(path: str | Path) -> np.ndarray:
    """An RGB uint8 target image ``(H, W, 3)`` from an image file (every k-th pixel of a side over
    4,096 px), a slide (its smallest level under 4,096 px) or a bundled sample name
    (``cmu_small_region``, ``hgsc_stroma``)."""
    from PIL import Image as PILImage

    p = _target_file(path)
    if p.suffix.lower() in (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".dcm"):
        from histofm.wsi import open_slide

        with open_slide(p) as slide:
            dims = slide.level_dimensions
            level = next((i for i, d in enumerate(dims) if max(d) <= 4096), len(dims) - 1)
            return np.asarray(slide.read_region((0, 0), level, dims[level]).convert("RGB"))
    try:
        with PILImage.open(p) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, PILImage.DecompressionBombError) as exc:
        raise HistofmError(f"Cannot read the stain target {p} as an image ({exc}); pass a PNG, JPEG or TIFF to --stain-target.") from None
    step = -(-max(rgb.shape[:2]) // 4096)  # like a slide's level under 4,096 px, but real pixels (no resampling)
    return np.ascontiguousarray(rgb[::step, ::step]) if step > 1 else rgb


@functools.lru_cache(maxsize=8)
def _fitted_target(name: str, path: str, stamp: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The fitted target statistics of file ``path`` (cached per name, file, size and modification time:
    a command that checks its target before any work and then uses it fits a large slide once)."""
    return normalizer(name).fit(read_target(path))._target()


def make_stain_transform(name: str, target_path: str | Path, per_image: bool = True) -> StainNormalize:
    """The callable ``histofm extract --stain-norm NAME --stain-target IMAGE`` applies to its uint8
    tile batches ``(B, 3, H, W)`` before the encoder's mean/std normalisation (device follows the batch)."""
    norm = normalizer(name)  # an unknown name fails before the target is read
    p = _target_file(target_path).resolve()
    stat = p.stat()
    target = _fitted_target(norm.name, str(p), (stat.st_size, stat.st_mtime_ns))
    norm.target = {k: v.clone() for k, v in target.items()}
    return StainNormalize(norm, per_image=per_image)
