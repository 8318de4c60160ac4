"""Multi-head self-attention with a packed qkv projection (timm names).

Scores go through ``F.scaled_dot_product_attention`` so PyTorch picks a fused
kernel (flash / memory-efficient on GPU, a fused C++ path on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError


class Attention(nn.Module):
    """``softmax(q k^T / sqrt(d)) v`` over ``num_heads`` heads, then an output projection."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise HistofmError(f"dim {dim} is not divisible by num_heads {num_heads}; choose num_heads that divides the width.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        # (B, N, 3*C) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
