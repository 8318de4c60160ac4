"""Attention-based deep MIL, plain and gated (Ilse, Tomczak & Welling, ICML 2018, arXiv 1802.04712).

Tile embeddings are projected ``h_n = ReLU(W_1 x_n)``, each tile gets an
attention weight, and the bag embedding is the attention-weighted mean:

    a_n = exp(w^T tanh(V h_n)) / sum_j exp(w^T tanh(V h_j))                      (plain)
    a_n = exp(w^T (tanh(V h_n) * sigm(U h_n))) / sum_j exp(...)                   (gated)
    z   = sum_n a_n h_n,        logits = W_c z + b_c

The weights ``a_n`` are the per-tile scores (they sum to one over the real tiles
of each bag; padded tiles get zero).
"""

from __future__ import annotations

import torch
from torch import nn

from histofm.mil.base import MILAggregator, MILOutput, dropout_layer, masked_softmax, register_aggregator


class AttentionScorer(nn.Module):
    """``a_n`` logits: ``w^T tanh(V h)`` or gated ``w^T (tanh(V h) * sigm(U h))``; ``branches`` outputs."""

    def __init__(self, dim: int, attn_dim: int = 128, gated: bool = True, branches: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.gated = gated
        self.attn_dim = attn_dim
        self.V = nn.Linear(dim, attn_dim)
        # Separate from V: one packed (dim -> 2 attn_dim) layer was no faster on CPU and its split
        # made backward hold an extra (N, 2 attn_dim) gradient (measured with benchmarks/mil.py).
        self.U = nn.Linear(dim, attn_dim) if gated else None
        self.drop = dropout_layer(dropout)
        self.w = nn.Linear(attn_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h (B, N, dim)`` -> attention logits ``(B, N, branches)``."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(self.drop(a))


@register_aggregator("abmil")
class ABMIL(MILAggregator):
    """Attention MIL; ``gated=True`` is the gated variant (the default, as in CLAM and most benchmarks).

    Args:
        in_dim: tile embedding size.
        num_classes: number of slide classes.
        hidden_dim: size of ``h_n``.
        attn_dim: size of the attention hidden layer (``V``, ``U``).
        gated: gated attention.
        dropout: dropout after the projection and in the attention net.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 256,
        attn_dim: int = 128,
        gated: bool = True,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, num_classes)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), dropout_layer(dropout))
        self.attention = AttentionScorer(hidden_dim, attn_dim, gated=gated, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        x, mask = self.check_inputs(features, mask)
        h = self.fc(x)  # (B, N, H)
        a = masked_softmax(self.attention(h).squeeze(-1), mask)  # (B, N)
        z = torch.bmm(a.unsqueeze(1), h).squeeze(1)  # (B, H)
        return MILOutput(logits=self.classifier(z), scores=a)


@register_aggregator("abmil_plain")
class ABMILPlain(ABMIL):
    """ABMIL with the plain (ungated) ``tanh`` attention."""

    def __init__(self, in_dim: int, num_classes: int, **kwargs: object) -> None:
        kwargs.setdefault("gated", False)
        super().__init__(in_dim, num_classes, **kwargs)  # type: ignore[arg-type]
