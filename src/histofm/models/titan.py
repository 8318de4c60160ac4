"""TITAN's slide encoder: a ViT over the 2-D grid of tile features, positions by 2-D ALiBi.

Ding, Wagner et al. 2024, "Multimodal whole slide foundation model for pathology"
(TITAN, arXiv 2411.19666; Mahmood Lab, weights ``MahmoodLab/TITAN``, gated, CC-BY-NC-ND-4.0).

**Idea.** Tiles of 512 px at 20x are embedded by CONCH v1.5 (768-d). Their features are
placed on a 2-D grid (one cell per tile, from the coordinates), the grid becomes a
sequence of tokens, and a 6-layer ViT (width 768, 12 heads) mixes them. There is no
position table: each head adds a bias to its attention scores that falls linearly with the
*Euclidean* distance between the two tiles' grid cells (2-D ALiBi), so a model trained on
crops of 14 x 14 cells extrapolates to whole slides. The slide embedding is an attentional
pooler's output (one learnt query attending to all tokens, as in CoCa)::

    cells:   c_i = floor((p_i - min_j p_j) / tile_size)        (pixel coordinates p_i)
    tokens:  t_i = GELU(W x_i + b); sequence [cls, t_1 ... t_N] in row-major cell order
    bias:    B_h[i, j] = -m_h * ||c_i - c_j||_2   (0 in the class token's row and column)
    attn:    softmax(q k^T / sqrt(d) + B_h) v
    slide:   e = MHA(LN(query), LN(h), LN(h))     (768)

**Slopes** ``m_h`` are ALiBi's (Press et al. 2022): for ``n`` a power of two,
``m_h = 2^(-8 h / n)``, ``h = 1..n``; otherwise the ``2^floor(log2 n)`` slopes followed by
every other slope of the ``2^(floor(log2 n) + 1)`` sequence (12 heads: ``2^-1 ... 2^-8``,
then ``2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5``).

**Behaviour kept from the official code** (read from its public ``vision_transformer.py``;
not checked against the released weights):

* cells that hold no tile are dropped, not padded, and so are cells whose summed feature
  vector is exactly zero (the official background test is ``any(feature != 0)``);
* two tiles in one cell are summed into one token;
* the grid is anchored at the smallest coordinate, so translating a slide changes nothing.

Status: **unverified**. No TITAN implementation is installable here, so nothing compares
our numbers with the official model. What the tests check is listed in
``docs/slide-encoders.md``. The official-layout loader maps the names of the public code
(``vision_encoder.blocks.modules_list.N`` -> ``blocks.N``, ``patch_embed.0`` ->
``patch_embed.proj``) and drops the text tower and the captioning pooler.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.models.vit import Block


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes ``(num_heads,)``: a geometric sequence starting at ``2^(-8/n)``."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        base = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(base) + power_of_two(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_2d_bias(cells: torch.Tensor, num_heads: int) -> torch.Tensor:
    """2-D ALiBi bias ``(H, 1 + N, 1 + N)`` for grid cells ``(N, 2)``; the class token (index 0) gets 0."""
    cells = cells.to(torch.float32)
    dist = torch.cdist(cells[None], cells[None])[0] if len(cells) else cells.new_zeros(0, 0)  # (N, N) Euclidean
    bias = torch.zeros(num_heads, len(cells) + 1, len(cells) + 1)
    bias[:, 1:, 1:] = -alibi_slopes(num_heads)[:, None, None] * dist
    return bias


def features_to_grid(
    features: torch.Tensor, coords: torch.Tensor, tile_size: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile features on their grid: ``(N, C), (N, 2)`` pixels -> tokens ``(M, C)`` and cells ``(M, 2)``.

    Cells are ``floor((p - min p) / tile_size)``; tokens come in row-major cell order (first
    coordinate slowest); duplicates in a cell are summed; empty or all-zero cells are left out.
    """
    cells = torch.div(coords.to(torch.float64) - coords.to(torch.float64).min(0).values, tile_size,
                      rounding_mode="floor").long()  # (N, 2)
    H, W = (int(v) + 1 for v in cells.max(0).values)
    flat = cells[:, 0] * W + cells[:, 1]
    grid = features.new_zeros(H * W, features.shape[1]).index_add_(0, flat, features)  # (H*W, C)
    keep = (grid != 0).any(dim=1)
    idx = torch.nonzero(keep).squeeze(1)  # row-major order
    return grid[idx], torch.stack([idx // W, idx % W], dim=1)


class AttentionalPooler(nn.Module):
    """``n_queries`` learnt queries attend to the tokens: ``MHA(LN_q(Q), LN_k(x), LN_k(x))`` (CoCa)."""

    def __init__(self, dim: int, num_heads: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)  # eps 1e-5: the official pooler uses plain nn.LayerNorm
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, n_queries, D)``."""
        k = self.ln_k(x)
        q = self.ln_q(self.query)[None].expand(x.shape[0], -1, -1)
        return self.attn(q, k, k, need_weights=False)[0]


class TitanSlideEncoder(nn.Module):
    """TITAN's vision tower (``TitanVisionConfig``: 768 wide, 6 layers, 12 heads, 2-D ALiBi).

    Args:
        in_chans: tile-feature width (768, CONCH v1.5).
        embed_dim: token width.
        depth: Transformer blocks.
        num_heads: attention heads (one ALiBi slope each).
        mlp_ratio: MLP width / ``embed_dim``.
        tile_size: pixel step of one grid cell in the coordinates (TITAN: 512 px at 20x,
            i.e. 1024 level-0 px on a 40x slide).
        attentional_pool: ``"parallel"`` (pooled from the tokens) or ``"cascade"`` (pooled from
            the 128-query captioning pooler's output) [U: the released config's choice];
            ``None`` embeds with the class token.
        pooler_heads: heads of the attentional poolers.
        pooler_queries: queries of the captioning pooler (built only for ``"cascade"``).
    """

    def __init__(
        self,
        in_chans: int = 768,
        embed_dim: int = 768,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        tile_size: float = 512,
        attentional_pool: str | None = "parallel",
        pooler_heads: int = 8,
        pooler_queries: int = 128,
    ) -> None:
        super().__init__()
        if attentional_pool not in (None, "parallel", "cascade"):
            raise HistofmError(f"attentional_pool must be None, 'parallel' or 'cascade', got {attentional_pool!r}; set one of those.")
        self.in_chans, self.embed_dim, self.num_heads, self.tile_size = in_chans, embed_dim, num_heads, tile_size
        self.attentional_pool = attentional_pool
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(in_chans, embed_dim)  # official: patch_embed.0 (Linear) then GELU
        self.act = nn.GELU()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = (
            AttentionalPooler(embed_dim, pooler_heads, pooler_queries) if attentional_pool == "cascade" else None
        )
        self.attn_pool_contrastive = AttentionalPooler(embed_dim, pooler_heads, 1) if attentional_pool else None
        # Projection into the text space, for zero-shot with TITAN's text tower (not part of the embedding).
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim)) if attentional_pool else None
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_tokens(self, features: torch.Tensor, coords: torch.Tensor, tile_size: float | None = None) -> torch.Tensor:
        """Normed tokens ``(1, 1 + M, D)`` of ONE slide: ``features (N, C)``, pixel ``coords (N, 2)``."""
        if features.dim() != 2 or features.shape[1] != self.in_chans or coords.shape != (len(features), 2):
            raise HistofmError(
                f"TITAN takes one slide's {self.in_chans}-d tile features (N, {self.in_chans}) and coordinates (N, 2), "
                f"got {tuple(features.shape)} and {tuple(coords.shape)}; extract features with the matching tile encoder."
            )
        if len(features) == 0:
            raise HistofmError("The slide has no tiles; check the tissue detection of `histofm extract`.")
        tokens, cells = features_to_grid(features.float(), coords, float(tile_size or self.tile_size))
        if len(tokens) == 0:
            raise HistofmError("Every tile feature of the slide is zero; extract the features again.")
        x = self.act(self.patch_embed.proj(tokens.to(self.cls_token.dtype)))[None]  # (1, M, D)
        x = torch.cat([self.cls_token, x], dim=1)  # (1, 1 + M, D)
        bias = alibi_2d_bias(cells, self.num_heads).to(x)[None]  # (1, H, 1 + M, 1 + M)
        for blk in self.blocks:
            x = blk(x, attn_mask=bias)
        return self.norm(x)

    def forward_one(self, features: torch.Tensor, coords: torch.Tensor, tile_size: float | None = None) -> torch.Tensor:
        """Slide embedding ``(D,)`` of one slide (the official ``encode_slide_from_patch_features``)."""
        x = self.forward_tokens(features, coords, tile_size)
        if self.attn_pool_contrastive is None:
            return x[0, 0]
        if self.attn_pool is not None:  # cascade: pool the captioning pooler's tokens
            x = self.attn_pool(x)
        return self.attn_pool_contrastive(x)[0, 0]

    def forward(self, features: torch.Tensor, coords: torch.Tensor, tile_size: float | None = None) -> torch.Tensor:
        """Slide embeddings ``(B, D)`` from ``(B, N, C)`` features and ``(B, N, 2)`` coordinates (or one slide unbatched).

        Each slide is encoded on its own grid, as the official inference does with batch size 1.
        """
        if features.dim() == 2:
            features, coords = features[None], coords[None]
        return torch.stack([self.forward_one(f, c, tile_size) for f, c in zip(features, coords)])


def titan_checkpoint_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official TITAN layout (``model.safetensors`` of ``MahmoodLab/TITAN``) -> ours.

    Keeps ``vision_encoder.*`` only (the text tower is not part of the slide encoder), renames
    ``blocks.modules_list.N`` -> ``blocks.N`` and ``patch_embed.0`` -> ``patch_embed.proj``, and
    drops the captioning pooler ``attn_pool.*`` unless the model cascades through it.
    """
    own = set(model.state_dict())
    out = {}
    for k, v in sd.items():
        if k.startswith("text_encoder.") or k.startswith("conch"):
            continue
        k = k.removeprefix("vision_encoder.")
        k = k.replace("blocks.modules_list.", "blocks.").replace("patch_embed.0.", "patch_embed.proj.")
        if k.startswith("attn_pool.") and not any(o.startswith("attn_pool.") for o in own):
            continue
        if k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias") and k not in own:
            continue
        out[k] = v
    return out
