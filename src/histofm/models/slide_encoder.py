"""Prov-GigaPath's slide encoder: a LongNet over all tile embeddings of a slide.

Xu et al. 2024, Nature, "A whole-slide foundation model for digital pathology from
real-world data" (model ``gigapath_slide_enc12l768d``, file ``slide_encoder.pth``).

**Idea.** A slide is a sequence of tiles. Each tile's 1536-d embedding (from the
Prov-GigaPath tile encoder) is projected to 768-d, gets a fixed 2-D sine-cosine position
embedding from the tile's grid cell, and a class token is prepended. Twelve LongNet layers
(:mod:`histofm.models.longnet`) mix all tiles of the slide; the slide embedding is the
class token after a final LayerNorm (or, with ``global_pool=True``, the mean of the tile
tokens, then the LayerNorm)::

    t_i  = W x_i + b + PE(cell_i)                 # (N, 768)
    h    = LongNet([cls + PE_0, t_1, ..., t_N])   # (1 + N, 768)
    e    = LN(h_0)              or  LN(mean_i h_i)  # 768

**Position embedding.** The official model keeps a table of ``1 + 1000^2`` rows (the MAE
2-D sine-cosine table over a 1000 x 1000 grid, row 0 for the class token, all zeros);
tile ``(x, y)`` (pixels at the tiling level, ``tile_size`` 256) takes row
``1 + floor(x/256) * 1000 + floor(y/256)``. The table row ``p`` encodes the column
``p mod 1000`` in its first half and the row ``p div 1000`` in its second half, so the
*y* cell lands in the first half and the *x* cell in the second. We compute exactly these
rows on the fly instead of holding the 3 GB table. A cell index past the grid raises an
error (the official code would index out of range or, for ``y`` past 1000, alias onto
the next row; we reproduce the aliasing, which is what the weights saw).

**Segment lengths.** ``get_optimal_segment_length(262144, 256)``: ``max_seq_len =
(262144 / 256)^2 = 2^20``; five lengths ``2^linspace(10, 20, 5)`` truncated to integers:
``[1024, 5792, 32768, 185363, 1048576]``, with dilations ``[1, 2, 4, 8, 16]``.

Names follow the official checkpoint (``patch_embed.proj``, ``cls_token``,
``encoder.layers.N.self_attn.q_proj`` ..., ``encoder.layer_norm``, ``norm``), so
``slide_encoder.pth`` (a ``{"model": state_dict}`` file) loads with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.models.longnet import LongNetEncoder

GIGAPATH_DILATIONS = (1, 2, 4, 8, 16)


def gigapath_segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256) -> list[int]:
    """Five segment lengths log-spaced from 1024 to the longest possible sequence (the official rule)."""
    max_seq_len = (max_wsi_size // tile_size) ** 2
    exponents = np.linspace(math.log2(1024), int(math.log2(max_seq_len)), 5)
    return [int(v) for v in np.power(2, exponents).astype(int)]


def sincos_1d_halves(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE's 1-D table: ``[sin(p w_0) ... sin(p w_{D/2-1}), cos(p w_0) ... ]``, ``w_i = 10000^(-2i/D)``.

    Note the layout: all sines, then all cosines (not interleaved). Computed in float64,
    as numpy does in the official code.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (D/2,)
    angles = pos.to(torch.float64)[..., None] * omega  # (..., D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def grid_sincos_rows(index: torch.Tensor, dim: int, grid: int) -> torch.Tensor:
    """Rows ``index`` (flat cell index ``row * grid + col``) of MAE's 2-D sine-cosine table.

    Returns ``(..., dim)`` float32: first half encodes ``col = index mod grid``, second half
    ``row = index div grid``.
    """
    col, row = index % grid, torch.div(index, grid, rounding_mode="floor")
    return torch.cat([sincos_1d_halves(col, dim // 2), sincos_1d_halves(row, dim // 2)], dim=-1).float()


class GigaPathSlideEncoder(nn.Module):
    """LongNet ViT over tile embeddings (``LongNetViT`` of the official code).

    Args:
        in_chans: tile-embedding width (1536 for Prov-GigaPath tiles).
        embed_dim: token width.
        depth: LongNet layers.
        num_heads: attention heads (16 in the official config).
        mlp_ratio: FFN width / ``embed_dim``.
        slide_ngrids: side of the position grid (1000).
        tile_size: pixel step of one grid cell in the coordinates given to ``forward``.
        segment_lengths: dilated-attention segment lengths (default: the official five).
        dilations: dilation ratios (default ``(1, 2, 4, 8, 16)``).
        global_pool: embed with the mean of the tile tokens instead of the class token.
        dropout: dropout inside LongNet (official default 0.25; inactive in eval mode).
        drop_path_rate: stochastic depth (official default 0.1).
    """

    def __init__(
        self,
        in_chans: int = 1536,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        slide_ngrids: int = 1000,
        tile_size: int = 256,
        segment_lengths: Sequence[int] | None = None,
        dilations: Sequence[int] = GIGAPATH_DILATIONS,
        global_pool: bool = False,
        dropout: float = 0.25,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if embed_dim % 4:
            raise HistofmError(f"embed_dim must be divisible by 4 for the 2-D sine-cosine table, got {embed_dim}; set embed_dim to a multiple of 4.")
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.slide_ngrids, self.tile_size, self.global_pool = slide_ngrids, tile_size, global_pool
        self.segment_lengths = list(segment_lengths or gigapath_segment_lengths(262144, tile_size))
        self.dilations = list(dilations)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(in_chans, embed_dim)  # official name: patch_embed.proj
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.encoder = LongNetEncoder(
            embed_dim, depth, num_heads, int(embed_dim * mlp_ratio), self.segment_lengths, self.dilations,
            dropout=dropout, drop_path_rate=drop_path_rate,
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def cell_index(self, coords: torch.Tensor, tile_size: float | None = None) -> torch.Tensor:
        """Flat grid cell ``floor(x / t) * G + floor(y / t)`` of each tile, ``coords (B, N, 2)`` -> ``(B, N)``."""
        t = float(tile_size or self.tile_size)
        cells = torch.floor(coords.to(torch.float64) / t).long()  # (B, N, 2): (x cell, y cell)
        index = cells[..., 0] * self.slide_ngrids + cells[..., 1]
        G = self.slide_ngrids
        if coords.numel() and (cells.min() < 0 or index.max() >= G * G):
            raise HistofmError(
                f"Tile coordinates fall outside the slide encoder's {G} x {G} grid of {t:g}-px cells "
                f"(max cell {int(cells.max())}); pass the tile step in pixels as tile_size (--set tile_size=...) "
                "or crop the slide."
            )
        return index

    def position_embedding(self, coords: torch.Tensor, tile_size: float | None = None) -> torch.Tensor:
        """``(B, N, D)`` rows of the fixed 2-D sine-cosine table for tile coordinates ``(B, N, 2)``."""
        return grid_sincos_rows(self.cell_index(coords, tile_size), self.embed_dim, self.slide_ngrids).to(
            self.cls_token.dtype
        )

    def _tokens(self, features: torch.Tensor, coords: torch.Tensor, tile_size: float | None) -> torch.Tensor:
        if features.dim() == 2:
            features, coords = features[None], coords[None]
        if features.dim() != 3 or features.shape[-1] != self.in_chans or coords.shape != (*features.shape[:2], 2):
            raise HistofmError(
                f"The slide encoder takes ({self.in_chans}-d) tile features (B, N, {self.in_chans}) and coordinates "
                f"(B, N, 2), got {tuple(features.shape)} and {tuple(coords.shape)}; extract features with the "
                "matching tile encoder."
            )
        x = self.patch_embed.proj(features.to(self.cls_token.dtype))  # (B, N, D)
        x = x + self.position_embedding(coords.to(x.device), tile_size)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # the class token's table row is all zeros
        return torch.cat([cls, x], dim=1)  # (B, 1 + N, D)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h[:, 1:].mean(dim=1)) if self.global_pool else self.norm(h)[:, 0]

    def forward(self, features: torch.Tensor, coords: torch.Tensor, tile_size: float | None = None) -> torch.Tensor:
        """Slide embedding ``(B, D)`` from tile features ``(B, N, C)`` and pixel coordinates ``(B, N, 2)``.

        ``tile_size`` is the pixel step of one tile in ``coords`` (default: the constructor's,
        256, as in the official pipeline where coordinates are at the tiling level).
        """
        h = self.encoder(self._tokens(features, coords, tile_size))[0]
        return self._pool(h)

    def forward_all_layers(
        self, features: torch.Tensor, coords: torch.Tensor, tile_size: float | None = None
    ) -> list[torch.Tensor]:
        """The official pipeline's ``all_layer_embed=True``: one ``(B, D)`` embedding per layer (input first).

        Pitfall kept from the official code: these per-layer embeddings skip LongNet's final
        LayerNorm, so the last one (the pipeline's ``last_layer_embed``) differs from
        :meth:`forward`, which applies it.
        """
        return [self._pool(h) for h in self.encoder(self._tokens(features, coords, tile_size), return_all=True)]
