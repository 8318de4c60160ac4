"""LongNet: dilated attention for sequences of tens of thousands of tokens.

Ding et al. 2023, "LongNet: Scaling Transformers to 1,000,000,000 Tokens", arXiv 2307.02486.
Prov-GigaPath's slide encoder runs it over every tile of a slide.

**Idea.** Full attention over ``N`` tokens costs ``O(N^2)``. Dilated attention splits
the sequence into segments of length ``w`` and, inside each segment, keeps every ``r``-th
row (the *dilation*). Attention is computed only among the kept rows of one segment:
``O(N w / r^2)`` per branch. A short dense branch (``w`` small, ``r = 1``) sees the local
neighbourhood exactly; long sparse branches (``w`` large, ``r`` large) see far away, coarsely.
Several branches ``(w_i, r_i)`` run side by side and their outputs are mixed.

**Equations** (one head, one branch ``(w, r)``; ``N`` padded with zeros to a multiple of ``w``)::

    segment s:      rows  I_s = { s*w + o + j*r : j = 0, 1, ... }   (offset o, see heads below)
    sparse attn:    O_s = softmax(Q[I_s] K[I_s]^T / sqrt(d)) V[I_s]      (|I_s| = w / r rows)
    denominator:    Z_s[q] = sum_{k in I_s} exp(q . k / sqrt(d))
    scatter:        O^{(w,r)}[I_s] = O_s ; rows outside every I_s stay 0 with Z = 0

Branches are mixed with weights proportional to their softmax denominators::

    O = sum_i  Z_i O^{(w_i, r_i)} / sum_j Z_j

which equals one softmax over the union of all keys the branches let a query see (a key
seen by two branches counts twice). In log space ``Z_i = exp(lse_i)``, so the weights are a
softmax over the branches' log-sum-exps: that is how the code computes them.

**Heads.** With ``H`` heads and dilation ``r``, heads are split into ``r`` groups and group
``g`` uses offset ``o = g``, so together the heads cover every row. The paper writes the
offset of head ``j`` as ``j mod r``; the official code (torchscale, used to train
Prov-GigaPath) gives *contiguous* blocks of ``H / r`` heads the same offset
(``o = j // (H / r)``), padding the head count to a multiple of ``r`` when needed. We
follow the code, since that is what the weights were trained with.

**Quirks kept from the official code, so its weights give the same numbers:**

* padding rows (the sequence padded to a multiple of ``w``, each segment to a multiple
  of ``r``) hold zero keys and values and are *not* masked: they take a little softmax mass
  (``exp(0)`` each) and contribute nothing to the output;
* a segment length larger than the sequence is cut to the sequence length;
* the official code computes the branch weights under ``torch.no_grad()`` (no gradient
  through the mixture); here gradients flow through them, as the equation says. Outputs
  are identical; only fine-tuning gradients differ slightly.

The layer around the attention is torchscale's ``EncoderLayer`` with sub-LayerNorm
(Magneto, ``subln=True``): a LayerNorm before the output projection of attention
(``inner_attn_ln``) and one inside the FFN after the activation (``ffn_layernorm``). Names
follow torchscale so ``slide_encoder.pth`` loads with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.layers import DropPath

# Filled in for (row, head) pairs a branch does not cover: the official code uses -1e8
# (not -inf) so a pair covered by no branch at all gets zero output instead of NaN.
_UNCOVERED_LSE = -1e8


def _pad_rows(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` up to a multiple of ``multiple``."""
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def dilated_branch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_length: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(w, r)`` branch of dilated attention.

    Args:
        q, k, v: ``(B, N, H, d)``.
        segment_length: ``w`` (cut to ``N`` when longer).
        dilation: ``r``.

    Returns:
        ``out (B, N, H, d)`` (zero where the branch does not cover a row for a head) and
        ``lse (B, N, H)`` float32, the log of the softmax denominator (``-1e8`` where not covered).
    """
    B, N, H, d = q.shape
    w, r = min(segment_length, N), dilation
    # (B, N, H, d) -> (B, S, w', H, d): S segments, each padded to a multiple of r
    q, k, v = (_pad_rows(_pad_rows(t, w, 1).view(B, -1, w, H, d), r, 2) for t in (q, k, v))
    S, w_pad = q.shape[1], q.shape[2]
    heads_per_group = math.ceil(H / r)  # heads padded to a multiple of r, padding heads dropped
    out = q.new_zeros(B, S, w_pad, H, d)
    lse = torch.full((B, S, w_pad, H), _UNCOVERED_LSE, device=q.device)  # float32 even for half inputs
    for g in range(r):
        heads = slice(g * heads_per_group, min((g + 1) * heads_per_group, H))
        if heads.start >= H:
            break
        qg, kg, vg = (t[:, :, g::r, heads] for t in (q, k, v))  # (B, S, w'/r, h_g, d) rows o = g, g+r, ...
        scores = torch.einsum("bslhd,bsmhd->bshlm", qg, kg) / math.sqrt(d)  # (B, S, h_g, L, L)
        scores_lse = torch.logsumexp(scores.float(), dim=-1)  # (B, S, h_g, L)
        probs = torch.exp(scores.float() - scores_lse[..., None]).to(vg.dtype)
        out[:, :, g::r, heads] = torch.einsum("bshlm,bsmhd->bslhd", probs, vg)
        lse[:, :, g::r, heads] = scores_lse.transpose(2, 3)
    out = out[:, :, :w].reshape(B, S * w, H, d)[:, :N]
    lse = lse[:, :, :w].reshape(B, S * w, H)[:, :N]
    return out, lse


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilations: Sequence[int],
) -> torch.Tensor:
    """Mixture of dilated-attention branches, weighted by their softmax denominators.

    Args:
        q, k, v: ``(B, N, H, d)``.
        segment_lengths: ``w_i`` of each branch.
        dilations: ``r_i`` of each branch (same length).

    Returns:
        ``(B, N, H, d)``. With every ``w_i >= N`` and every ``r_i = 1`` this is full attention.
    """
    if len(segment_lengths) != len(dilations) or not segment_lengths:
        raise HistofmError(f"LongNet needs one dilation per segment length, got {list(segment_lengths)} and {list(dilations)}; give both lists the same length.")
    outs, lses = zip(*(dilated_branch(q, k, v, w, r) for w, r in zip(segment_lengths, dilations)))
    weights = torch.softmax(torch.stack(lses).float(), dim=0).to(q.dtype)  # (branches, B, N, H): Z_i / sum_j Z_j
    return sum(wt[..., None] * o for wt, o in zip(weights, outs))  # type: ignore[return-value]


class DilatedAttention(nn.Module):
    """Multi-head dilated self-attention with torchscale's names (``q_proj``, ``k_proj``, ...)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilations: Sequence[int],
        subln: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise HistofmError(f"dim {dim} is not divisible by num_heads {num_heads}; choose num_heads that divides the width.")
        self.num_heads = num_heads
        self.segment_lengths = [int(w) for w in segment_lengths]
        self.dilations = [int(r) for r in dilations]
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps) if subln else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = dilated_attention(q, k, v, self.segment_lengths, self.dilations).reshape(B, N, C)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)


class FeedForward(nn.Module):
    """``fc2(LN(gelu(fc1(x))))``: torchscale's FFN with sub-LayerNorm."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, subln: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps) if subln else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x).float()).type_as(x)  # torchscale activates in float32
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        return self.dropout(self.fc2(x))


class LongNetEncoderLayer(nn.Module):
    """Pre-norm block: ``x + DropPath(Drop(attn(LN(x))))``, then ``x + DropPath(ffn(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        segment_lengths: Sequence[int],
        dilations: Sequence[int],
        dropout: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = DilatedAttention(dim, num_heads, segment_lengths, dilations, eps=eps)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout_module = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim, dropout=dropout, eps=eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.dropout_module(self.self_attn(self.self_attn_layer_norm(x))))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))


class LongNetEncoder(nn.Module):
    """A stack of :class:`LongNetEncoderLayer` and a final LayerNorm (torchscale ``Encoder`` names).

    Args:
        dim: token width.
        depth: number of layers.
        num_heads: attention heads.
        ffn_dim: FFN hidden width.
        segment_lengths: ``w_i`` of the dilated-attention branches.
        dilations: ``r_i`` of the branches.
        dropout: dropout after embedding, attention and FFN (as torchscale).
        drop_path_rate: stochastic depth, rising linearly from 0 at the first layer.
        eps: LayerNorm epsilon (torchscale's default 1e-5).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        ffn_dim: int,
        segment_lengths: Sequence[int],
        dilations: Sequence[int],
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        rates = np.linspace(0, drop_path_rate, depth) if depth > 0 else []
        self.dropout_module = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            LongNetEncoderLayer(dim, num_heads, ffn_dim, segment_lengths, dilations, dropout, float(p), eps)
            for p in rates
        )
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, return_all: bool = False) -> list[torch.Tensor]:
        """``x (B, N, D)`` -> ``[LN(out)]``; with ``return_all``: the input and every layer's output.

        As in torchscale, the per-layer outputs of ``return_all`` do NOT pass through the
        final LayerNorm (only ``encoder_out`` does).
        """
        x = self.dropout_module(x)
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return states if return_all else [self.layer_norm(x)]
