"""CLIP-family Transformers in open_clip's parameter layout: the text tower and its building blocks.

CLIP (Radford et al. 2021, arXiv 2103.00020) reads a caption with a pre-norm
Transformer under a causal mask and takes the feature at the end-of-text token
(the highest id in each row, so ``argmax`` finds it)::

    x = E[tokens] + P[:L]                                    # (B, L, W)
    x = x + Attn(LN_1(x), causal);  x = x + MLP(LN_2(x))      # per block
    t = LN_final(x)[b, argmax(tokens[b])] @ text_projection   # (B, E)

CoCa (Yu et al. 2022, arXiv 2205.01917) appends a learned class embedding
``cls_emb`` after the text and pools *it* instead (LayerNorm after pooling). Its
row may not look at padding keys; the official code (open_clip's legacy mode,
kept by CONCH) shifts that padding mask one position right, so the class token
sees key 0 always and the first padding position too. We keep the shift: the
checkpoints were trained with it.

Parameter names follow open_clip (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection``,
``cls_emb``), and the attention stores its weights as ``nn.MultiheadAttention``
does (packed ``in_proj_weight``; separate ``q/k/v_proj_weight`` when keys have
another width), so official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.models.transformer import _activation


class MultiheadAttention(nn.Module):
    """Batch-first attention with ``nn.MultiheadAttention``'s parameters and a boolean mask (True = may attend).

    Args:
        d_model: query width ``D`` (and output width).
        num_heads: heads; ``D`` must be divisible by it.
        kdim: key/value width when it differs from ``D`` (attentional poolers); then
            the projections are stored apart as ``q_proj_weight``, ``k_proj_weight``,
            ``v_proj_weight``, as PyTorch does.
    """

    def __init__(self, d_model: int, num_heads: int, kdim: int | None = None) -> None:
        super().__init__()
        if d_model % num_heads:
            raise HistofmError(f"d_model {d_model} is not divisible by num_heads {num_heads}; choose num_heads that divides the width.")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.packed = kdim is None or kdim == d_model
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))  # rows: W_q; W_k; W_v
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(d_model, d_model))
            self.k_proj_weight = nn.Parameter(torch.empty(d_model, kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(d_model, kdim))
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``q`` ``(B, Lq, D)`` attends to ``kv`` ``(B, Lk, Dk)`` (default ``q``); ``mask`` broadcasts to ``(B, h, Lq, Lk)``."""
        bq, bk, bv = self.in_proj_bias.chunk(3)
        if self.packed:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        kv = q if kv is None else kv
        B, Lq, D = q.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(B, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)

        out = F.scaled_dot_product_attention(
            heads(F.linear(q, wq, bq)), heads(F.linear(kv, wk, bk)), heads(F.linear(kv, wv, bv)), attn_mask=mask
        )  # (B, h, Lq, d)
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, D))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block ``x + Attn(LN_1(x)); x + MLP(LN_2(x))``; with ``cross_attention`` the keys are ``LN_1_kv(memory)``."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", cross_attention: bool = False
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        if cross_attention:
            self.ln_1_kv = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), c_proj=nn.Linear(hidden, width)))
        self.act = _activation(act)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` ``(B, L, W)`` -> ``(B, L, W)``; ``memory`` ``(B, S, W)`` for cross-attention blocks."""
        kv = self.ln_1_kv(memory) if memory is not None else None
        x = x + self.attn(self.ln_1(x), kv, mask)
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x))))


class Transformer(nn.Module):
    """``layers`` :class:`ResidualAttentionBlock` under ``resblocks`` (open_clip's ``Transformer``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu") -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """``(n, n)`` bool, True where query ``i`` may see key ``j <= i``."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class TextTransformer(nn.Module):
    """Token ids ``(B, L)`` -> pooled text feature ``(B, E)`` and token features ``(B, L, W)``.

    Args:
        vocab_size, context_length: ids and positions (the position table has
            ``context_length`` rows; with ``embed_cls`` it must cover the class slot too).
        width, heads, layers, mlp_ratio: the Transformer.
        embed_dim: output size ``E`` of ``text_projection`` (``(W, E)``).
        act: ``"gelu"`` or ``"quick_gelu"`` (OpenAI-trained CLIPs).
        embed_cls: append CoCa's ``cls_emb`` and pool it.
        pad_id: padding id (CoCa's class-token mask).
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        embed_dim: int = 512,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        embed_cls: bool = False,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.context_length, self.pad_id = context_length, pad_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.cls_emb = nn.Parameter(torch.empty(width)) if embed_cls else None
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)

    def _cls_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, 1, L+1, L+1)`` causal mask whose last (class) row skips padding, shifted as in the official CoCa."""
        B, L = tokens.shape
        mask = causal_mask(L + 1, tokens.device).expand(B, L + 1, L + 1).clone()
        ok = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=tokens.device), tokens != self.pad_id], 1)
        mask[:, -1] = ok  # key j (>= 1) is open iff token j-1 is not padding: the legacy off-by-one
        return mask.unsqueeze(1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(pooled @ text_projection (B, E), token features (B, L, W))``."""
        B, L = tokens.shape
        x = self.token_embedding(tokens)  # (B, L, W)
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.expand(B, 1, -1).to(x.dtype)], 1)  # (B, L+1, W)
            mask = self._cls_mask(tokens)
        else:
            mask = causal_mask(L, tokens.device)
        n = x.shape[1]
        if n > self.positional_embedding.shape[0]:
            raise HistofmError(f"{n} text positions exceed the context length {self.positional_embedding.shape[0]}; tokenize with that context length (or shorter texts).")
        x = self.transformer(x + self.positional_embedding[:n], mask)
        if self.cls_emb is not None:
            pooled, feats = self.ln_final(x[:, -1]), x[:, :-1]
        else:
            feats = self.ln_final(x)
            pooled = feats[torch.arange(B, device=x.device), tokens.argmax(dim=-1)]  # at EOT (highest id)
        return pooled @ self.text_projection, feats

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding", "cls_emb"}
