"""Image to patch tokens: a strided convolution with kernel = stride = patch size."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to ``embed_dim``.

    Returns tokens ``(B, H', W', D)`` so the caller knows the grid size; any input
    whose sides are multiples of the patch size is accepted (dynamic image size).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise HistofmError(f"Input size {H}x{W} is not a multiple of the patch size {ph}x{pw}; resize or crop the images to a multiple of it.")
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, D)


@functools.lru_cache(maxsize=32)
def _pi_resize_matrix(
    old_size: tuple[int, int], new_size: tuple[int, int], interpolation: str, antialias: bool
) -> torch.Tensor:
    """``pinv(B^T)`` where ``B`` (new_pixels x old_pixels) is the linear image-resize operator."""
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, dtype=torch.float64).reshape(n_old, 1, *old_size)  # one image per old pixel
    resized = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias)  # (n_old, 1, H, W)
    B = resized.reshape(n_old, -1).T  # (n_new, n_old): x_new = B x_old
    # pinv(B^T) through the normal equations of the smaller side (B has full rank for
    # bilinear/bicubic resizes); an SVD-based pinv only if that system is singular.
    try:
        if B.shape[0] >= B.shape[1]:  # upsampling: pinv(B^T) = B (B^T B)^-1
            return torch.linalg.solve(B.T @ B, B.T).T
        return torch.linalg.solve(B @ B.T, B)  # downsampling: pinv(B^T) = (B B^T)^-1 B
    except RuntimeError:
        return torch.linalg.pinv(B.T)


def resize_patch_embed(
    weight: torch.Tensor,
    new_size: int | tuple[int, int],
    interpolation: str = "bilinear",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a patch-embedding kernel with FlexiViT's pseudo-inverse resize (PI-resize).

    FlexiViT (Beyer et al. 2023, arXiv 2212.08013, Sec. 3.4) asks that a patch ``x``
    and its resized version ``B x`` give the same token: ``<x, w> = <B x, w_new>``
    for all ``x``. The least-squares solution is

        w_new = pinv(B^T) w

    which is exact when upsampling (``new >= old``) and the best approximation when
    downsampling. ``B`` is the linear operator of ``F.interpolate`` with the given
    ``interpolation`` / ``antialias``, built column by column from basis images.

    Args:
        weight: conv kernel ``(D, C, h, w)``.
        new_size: target kernel size.
        interpolation: ``"bilinear"`` (FlexiViT) or ``"bicubic"``.
        antialias: antialias the resize operator when downsampling.

    Returns:
        The kernel ``(D, C, H, W)`` in the input dtype.
    """
    new = to_2tuple(new_size)
    old = (int(weight.shape[-2]), int(weight.shape[-1]))
    if new == old:
        return weight
    pinv = _pi_resize_matrix(old, new, interpolation, antialias).to(weight.device)  # (H*W, h*w)
    D, C = weight.shape[:2]
    flat = weight.reshape(D * C, old[0] * old[1]).to(torch.float64)
    out = flat @ pinv.T  # (D*C, H*W)
    return out.reshape(D, C, *new).to(weight.dtype)
