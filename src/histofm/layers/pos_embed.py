"""Position embeddings: resampling learned grids, and fixed sine-cosine tables."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from histofm.errors import HistofmError


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a learned ``(1, prefix + H*W, D)`` position table to a new grid.

    Prefix-token rows (class, registers) are kept unchanged; the grid part is
    interpolated as a ``D``-channel image (bicubic, antialiased), as in timm and
    DINOv2, so a model trained at 224 px runs at any multiple of its patch size.
    """
    num_grid = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(math.sqrt(num_grid))
        old_size = (side, side)
    if tuple(new_size) == tuple(old_size):
        return posemb
    if old_size[0] * old_size[1] != num_grid:
        raise HistofmError(f"The position table has {num_grid} grid rows, not {old_size[0]}x{old_size[1]}; pass the grid size the weights were trained with.")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = posemb.shape[-1]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(orig_dtype)  # (1, H'*W', D)
    return torch.cat([prefix, grid], dim=1)


def sincos_1d(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. table: ``PE[p, 2i] = sin(p / base^(2i/d))``, ``PE[p, 2i+1] = cos(...)``."""
    if dim % 2:
        raise HistofmError(f"A sine-cosine embedding needs an even dim, got {dim}; use an even embed_dim.")
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (P, D/2)
    table = torch.zeros(positions.shape[0], dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


def sincos_2d(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """2-D table (MAE): half the channels encode the row, half the column. ``(H*W, D)``."""
    if dim % 4:
        raise HistofmError(f"A 2-D sine-cosine embedding needs a dim divisible by 4, got {dim}; use an embed_dim divisible by 4.")
    h, w = grid_size
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], dim=1)
