"""TransMIL: Transformer-based correlated MIL (Shao et al., NeurIPS 2021, arXiv 2106.00908).

Tiles attend to each other, so the model can use correlations between tiles
instead of treating them as independent. A slide has tens of thousands of tiles,
so full self-attention is replaced by Nystrom attention (Xiong et al., AAAI
2021, arXiv 2102.03902), and position is encoded by PPEG, depthwise convolutions
over the tiles laid out on a square grid::

    h = ReLU(W_1 x)                                        # (N, 512)
    h = [cls; h; h_1..h_{S^2-N}],  S = ceil(sqrt(N))        # fill the square by repeating the first tiles
    h = h + NystromMSA(LN(h));  h = PPEG(h);  h = h + NystromMSA(LN(h))
    logits = W_c LN(h)_cls

Nystrom attention approximates ``softmax(Q K^T / sqrt(d)) V`` with ``m`` landmarks
``Q~, K~`` (means of ``m`` contiguous segments of the queries and keys):

    softmax(Q K~^T) . pinv(softmax(Q~ K~^T)) . softmax(Q~ K^T) V

where ``pinv`` is the iterative Moore-Penrose inverse of Razavi et al. (2014).
The two wide products are themselves attention calls (``m`` queries over all
``N`` keys, and ``N`` queries over ``m`` keys), so they go through PyTorch's
fused ``scaled_dot_product_attention`` and the ``(N, m)`` softmax matrices are
never stored for the backward pass. Only the ``(m, m)`` kernel is materialised.

The per-tile score (computed in eval mode only; ``scores`` is ``None`` while
training, which skips an extra pass over the keys) is the (approximate)
attention of the class token to each tile in the FIRST layer, averaged over heads (``score_layer=2`` takes the last
layer). After PPEG a token carries its 7 x 7 grid neighbours' content, so the
last layer's weights spread over the neighbours of the decisive tiles: on the
synthetic bags of ``tests/test_mil_aggregators.py`` the top-attended tiles were
the planted ones with precision 0.73 in layer 1 against 0.53 in layer 2. Padded batches are processed bag
by bag, because the square layout of PPEG depends on the bag size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.mil.base import MILAggregator, MILOutput, dropout_layer, register_aggregator


def iterative_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of square matrices ``(..., m, m)`` by Newton-Schulz-style iteration.

    ``Z_0 = X^T / (||X||_1 ||X||_inf)``, then
    ``Z <- 1/4 Z (13 I - X Z (15 I - X Z (7 I - X Z)))`` (Razavi et al. 2014, as in Nystromformer).
    """
    abs_x = x.abs()
    norm1 = abs_x.sum(dim=-2).amax(dim=-1, keepdim=True)  # max column sum, (..., 1)
    norm_inf = abs_x.sum(dim=-1).amax(dim=-1, keepdim=True)  # max row sum
    shape, m = x.shape, x.shape[-1]
    x = x.reshape(-1, m, m)
    z = x.transpose(-1, -2) / (norm1 * norm_inf).reshape(-1, 1, 1)
    eye = torch.eye(m, dtype=x.dtype, device=x.device).expand_as(x)
    for _ in range(iterations):
        xz = torch.bmm(x, z)
        t = torch.baddbmm(15 * eye, xz, 7 * eye - xz, alpha=-1)  # 15 I - XZ (7 I - XZ)
        t = torch.baddbmm(13 * eye, xz, t, alpha=-1)  # 13 I - XZ (...)
        z = 0.25 * torch.bmm(z, t)
    return z.reshape(shape)


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of ``m`` contiguous, nearly equal segments along dim -2: ``(..., N, d)`` -> ``(..., m, d)``."""
    n = x.shape[-2]
    if n % m == 0:
        return x.unflatten(-2, (m, n // m)).mean(dim=-2)
    seg = torch.arange(n, device=x.device) * m // n  # segment id of each position, sizes floor/ceil(n/m)
    counts = torch.bincount(seg, minlength=m).to(x.dtype)
    sums = torch.zeros(*x.shape[:-2], m, x.shape[-1], dtype=x.dtype, device=x.device).index_add(-2, seg, x)
    return sums / counts.unsqueeze(-1)


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention with a depthwise-convolution residual on the values.

    Args:
        dim: token size.
        num_heads: heads.
        head_dim: size per head (TransMIL: ``dim // 8``).
        num_landmarks: ``m``; bags with fewer tokens use every token as a landmark (exact attention).
        pinv_iterations: iterations of :func:`iterative_pinv`.
        residual_kernel: length of the per-head depthwise convolution over the value sequence
            added to the output (Nystromformer's "skip" term); 0 disables it.
        dropout: dropout on the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, dim)
        self.drop = dropout_layer(dropout)
        self.res_conv = (
            nn.Conv2d(num_heads, num_heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                      groups=num_heads, bias=False)
            if residual_kernel else None
        )

    def forward(self, x: torch.Tensor, first_token_scores: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x (B, N, dim)`` -> output ``(B, N, dim)`` and, if asked, the first token's attention ``(B, N)``."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        m = min(self.num_landmarks, N)
        q_l, k_l = segment_means(q, m), segment_means(k, m)  # (B, h, m, d)
        scale = self.head_dim**-0.5
        kernel = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, dim=-1)  # (B, h, m, m)
        kernel_inv = iterative_pinv(kernel, self.pinv_iterations)
        landmark_values = F.scaled_dot_product_attention(q_l, k, v)  # softmax(Q~ K^T) V, (B, h, m, d)
        w = kernel_inv @ landmark_values  # (B, h, m, d)
        out = F.scaled_dot_product_attention(q, k_l, w)  # softmax(Q K~^T) W, (B, h, N, d)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = self.drop(self.proj(out.transpose(1, 2).flatten(2)))  # (B, N, dim)
        scores = None
        if first_token_scores:
            with torch.no_grad():
                scores = self._first_row(q[:, :, :1], k, q_l, k_l, kernel_inv, scale)
        return out, scores

    @staticmethod
    def _first_row(
        q0: torch.Tensor, k: torch.Tensor, q_l: torch.Tensor, k_l: torch.Tensor, kernel_inv: torch.Tensor,
        scale: float, chunk: int = 8192,
    ) -> torch.Tensor:
        """Row of the approximate attention matrix for query ``q0``, averaged over heads, ``(B, N)``.

        ``row = softmax(q0 K~^T) pinv(.) softmax(Q~ K^T)``; the ``(m, N)`` softmax is
        built chunk by chunk over the keys, with its normaliser computed first.
        """
        coef = torch.softmax(q0 @ k_l.transpose(-1, -2) * scale, dim=-1) @ kernel_inv  # (B, h, 1, m)
        N = k.shape[-2]
        lse = torch.cat(
            [(q_l @ k[:, :, s : s + chunk].transpose(-1, -2) * scale).logsumexp(-1, keepdim=True)
             for s in range(0, N, chunk)], dim=-1,
        ).logsumexp(-1, keepdim=True)  # (B, h, m, 1)
        rows = []
        for s in range(0, N, chunk):
            p = torch.exp(q_l @ k[:, :, s : s + chunk].transpose(-1, -2) * scale - lse)  # (B, h, m, c)
            rows.append((coef @ p).squeeze(-2))  # (B, h, c)
        return torch.cat(rows, dim=-1).mean(dim=1)  # (B, N)


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + DW7(x) + DW5(x) + DW3(x)`` on the square tile grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``x (B, 1 + side^2, C)`` (class token first) -> same shape."""
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).unflatten(-1, (side, side))  # (B, C, S, S)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom attention (TransMIL has no MLP in its layers)."""

    def __init__(self, dim: int, num_heads: int, num_landmarks: int, dropout: float, residual_kernel: int = 33) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, num_heads, dim // num_heads, num_landmarks,
                                     residual_kernel=residual_kernel, dropout=dropout)

    def forward(self, x: torch.Tensor, first_token_scores: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, scores = self.attn(self.norm(x), first_token_scores)
        return x + out, scores


@register_aggregator("transmil")
class TransMIL(MILAggregator):
    """TransMIL with Nystrom attention and PPEG.

    Args:
        in_dim: tile embedding size.
        num_classes: number of slide classes.
        dim: token size inside the model (paper: 512).
        num_heads: attention heads (paper: 8).
        num_landmarks: Nystrom landmarks (paper: ``dim // 2``).
        dropout: dropout on the attention outputs (paper: 0.1).
        score_layer: which layer's class-token attention is returned as per-tile scores (1 or 2).
        residual_kernel: length of the value-convolution residual of both attention layers (the
            original code's 33; 0 removes it). It adds to every token, the class token included,
            a learned, position-dependent mix of its sequence neighbours' values, so the output
            depends on the tile order (see docs/aggregation.md, "One tile in a hundred").
        ppeg: the position encoding between the layers (``False`` leaves it out: for bags whose
            tile order means nothing, where it mixes each tile with random neighbours).
        num_layers: 2 (the paper) or 1: the class token reads the tiles in one attention layer,
            before they have attended to each other, with no PPEG and no square fill (an
            ablation, see the docs). Two layers keep the square fill even with ``ppeg=False``.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 512,
        num_heads: int = 8,
        num_landmarks: int | None = None,
        dropout: float = 0.1,
        score_layer: int = 1,
        residual_kernel: int = 33,
        ppeg: bool = True,
        num_layers: int = 2,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if num_layers not in (1, 2):
            raise HistofmError(f"num_layers must be 1 or 2, got {num_layers}; set --set num_layers=2 or 1.")
        if score_layer not in (1, 2) or score_layer > num_layers:
            raise HistofmError(f"score_layer must be 1 or 2 (at most num_layers), got {score_layer}; "
                               "set --set score_layer=1.")
        self.score_layer = score_layer
        landmarks = num_landmarks or dim // 2
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        if residual_kernel < 0 or (residual_kernel and residual_kernel % 2 == 0):
            raise HistofmError(f"residual_kernel must be 0 or odd, got {residual_kernel}; set --set residual_kernel=33 or 0.")
        self.layer1 = TransLayer(dim, num_heads, landmarks, dropout, residual_kernel)
        self.pos = PPEG(dim) if ppeg and num_layers == 2 else None
        self.layer2 = TransLayer(dim, num_heads, landmarks, dropout, residual_kernel) if num_layers == 2 else None
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def _bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One or more bags of equal size ``(B, N, D)`` -> logits ``(B, C)``, scores ``(B, N)``."""
        B, N, _ = x.shape
        h = self.fc(x)  # (B, N, dim)
        side = math.ceil(math.sqrt(N))
        fill = side * side - N if self.layer2 is not None else 0  # one layer: no grid, no fill
        if fill:
            h = torch.cat([h, h[:, torch.arange(fill, device=h.device) % N]], dim=1)  # (B, side^2, dim)
        h = torch.cat([self.cls_token.expand(B, -1, -1), h], dim=1)
        want = not self.training  # scores are for heatmaps; training skips their extra pass over the keys
        h, row1 = self.layer1(h, first_token_scores=want and self.score_layer == 1)
        if self.pos is not None:
            h = self.pos(h, side)
        row2 = None
        if self.layer2 is not None:
            h, row2 = self.layer2(h, first_token_scores=want and self.score_layer == 2)
        row = row1 if self.score_layer == 1 else row2
        logits = self.head(self.norm(h)[:, 0])
        if row is None:
            return logits, None
        tiles = row[:, 1:]  # (B, side^2) attention of the class token to each grid cell
        scores = tiles[:, :N].clone()
        if fill:  # a repeated tile's attention belongs to the tile it copies
            scores.index_add_(1, torch.arange(fill, device=h.device) % N, tiles[:, N:])
        return logits, scores

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        x, mask = self.check_inputs(features, mask)
        if bool(mask.all()):
            logits, scores = self._bag(x)
            return MILOutput(logits=logits, scores=scores)
        logits_list = []
        scores_full = None if self.training else torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        for b in range(x.shape[0]):
            real = mask[b].nonzero().squeeze(-1)
            lb, sb = self._bag(x[b : b + 1, real])
            logits_list.append(lb)
            if scores_full is not None and sb is not None:
                scores_full[b, real] = sb[0]
        return MILOutput(logits=torch.cat(logits_list), scores=scores_full)
