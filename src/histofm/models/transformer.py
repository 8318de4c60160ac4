"""The Transformer of Vaswani et al. 2017, "Attention Is All You Need" (arXiv 1706.03762).

An encoder reads the source sequence with self-attention; a decoder writes the
target one token at a time with causal self-attention plus cross-attention to
the encoder's output. Everything rests on scaled dot-product attention::

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

Positions enter through a fixed sinusoidal table added to the scaled token
embeddings (``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1] = cos(...)``).
Each sub-layer is wrapped in a residual connection and a LayerNorm, either after
the residual (``norm_first=False``, the paper's post-norm) or before the
sub-layer (``norm_first=True``, pre-norm: more stable, used by GPT-2, ViT, CLIP;
it then needs one final LayerNorm after the stack).

Masks follow PyTorch's conventions: a ``key_padding_mask`` ``(B, L)`` is ``True``
at padding positions (they are never attended to), and ``causal=True`` stops
position ``t`` from attending to positions ``> t``.

The attention modules store their projections exactly like
``torch.nn.MultiheadAttention`` (``in_proj_weight`` packed q;k;v, ``in_proj_bias``,
``out_proj``) and the layers use ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` names (``self_attn``, ``multihead_attn``,
``linear1``, ``linear2``, ``norm1..3``), so weights move between the two with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.layers.pos_embed import sincos_1d

Activation = str | Callable[[torch.Tensor], torch.Tensor]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's approximation
}


def _activation(act: Activation) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(act):
        return act
    if act not in _ACTIVATIONS:
        raise HistofmError(f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {act!r}; pass one of those.")
    return _ACTIVATIONS[act]


def build_attention_mask(
    batch: int,
    q_len: int,
    k_len: int,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask for ``F.scaled_dot_product_attention``: ``True`` = may attend.

    Args:
        batch: batch size ``B``.
        q_len: number of queries ``Lq``.
        k_len: number of keys ``Lk``.
        key_padding_mask: ``(B, Lk)`` bool, ``True`` at padding keys, or ``None``.
        causal: forbid query ``t`` from attending to keys ``> t``.
        device: where to build the mask.

    Returns:
        ``(B, 1, Lq, Lk)`` bool (broadcast over heads), or ``None`` when nothing is masked.
        A query row whose keys are all masked would make softmax return NaN; such rows
        are left fully open instead (their outputs belong to padding and are ignored).
    """
    if key_padding_mask is None and not causal:
        return None
    allowed = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, k_len):
            raise HistofmError(f"key_padding_mask must have shape {(batch, k_len)}, got {tuple(key_padding_mask.shape)}; pass one flag per key.")
        allowed = allowed & ~key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if causal:
        # Query t sees keys 0..t (+ offset when keys outnumber queries, e.g. with a prefix).
        tri = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
        allowed = allowed & tri
    return allowed | ~allowed.any(dim=-1, keepdim=True)  # never an empty row


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (batch first).

    Args:
        d_model: model width ``D``.
        num_heads: number of heads ``h``; ``D`` must be divisible by it.
        dropout: dropout on the attention probabilities (training only).
        bias: biases on the input and output projections.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model % num_heads:
            raise HistofmError(f"d_model {d_model} is not divisible by num_heads {num_heads}; choose num_heads that divides the width.")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))  # rows: W^Q; W^K; W^V
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model)) if bias else None
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d_k)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attend from ``query`` ``(B, Lq, D)`` to ``key``/``value`` ``(B, Lk, D)``.

        ``key`` and ``value`` default to ``query`` (self-attention). Returns ``(B, Lq, D)``.
        """
        B, Lq, D = query.shape
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is None and value is None:
            # Self-attention: one packed matmul for q, k, v.
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)  # (B, L, D) each
        else:
            key = query if key is None else key
            value = key if value is None else value
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            wq, wk, wv = w.chunk(3)
            q = F.linear(query, wq, bq)
            if key is value:
                k, v = F.linear(key, torch.cat([wk, wv]), None if b is None else torch.cat([bk, bv])).chunk(2, dim=-1)
            else:
                k, v = F.linear(key, wk, bk), F.linear(value, wv, bv)
        Lk = k.shape[1]
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        drop = self.dropout if self.training else 0.0
        if key_padding_mask is None and causal and Lq == Lk:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            mask = build_attention_mask(B, Lq, Lk, key_padding_mask, causal, query.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, h, Lq, d_k)
        out = out.transpose(1, 2).reshape(B, Lq, D)
        return self.out_proj(out)


class TransformerEncoderLayer(nn.Module):
    """Self-attention then a position-wise feed-forward network, each with residual + LayerNorm.

    Post-norm (paper): ``x = LN(x + Drop(SA(x)))``; ``x = LN(x + Drop(FFN(x)))``.
    Pre-norm: ``x = x + Drop(SA(LN(x)))``; ``x = x + Drop(FFN(LN(x)))``.
    ``FFN(x) = W_2 act(W_1 x + b_1) + b_2`` with ReLU in the paper.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = True,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def _sa(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, key_padding_mask=key_padding_mask, causal=causal))

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """``x`` ``(B, L, D)`` -> ``(B, L, D)``."""
        if self.norm_first:
            x = x + self._sa(self.norm1(x), key_padding_mask, causal)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, key_padding_mask, causal))
        return self.norm2(x + self._ff(x))


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, then the feed-forward network."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = True,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout)
        self.multihead_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def _sa(self, x: torch.Tensor, pad: torch.Tensor | None, causal: bool) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, key_padding_mask=pad, causal=causal))

    def _ca(self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        return self.dropout2(self.multihead_attn(x, memory, memory, key_padding_mask=pad))

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Target ``x`` ``(B, T, D)`` attending to ``memory`` ``(B, S, D)`` -> ``(B, T, D)``."""
        if self.norm_first:
            x = x + self._sa(self.norm1(x), tgt_key_padding_mask, causal)
            x = x + self._ca(self.norm2(x), memory, memory_key_padding_mask)
            return x + self._ff(self.norm3(x))
        x = self.norm1(x + self._sa(x, tgt_key_padding_mask, causal))
        x = self.norm2(x + self._ca(x, memory, memory_key_padding_mask))
        return self.norm3(x + self._ff(x))


class _LayerStack(nn.Module):
    """``num_layers`` layers of ``layer_cls`` and, with pre-norm, one final LayerNorm (arguments below)."""

    layer_cls: type[nn.Module]

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_layers: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = True,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            self.layer_cls(d_model, num_heads, d_ff, dropout, norm_first, activation, layer_norm_eps)
            for _ in range(num_layers)
        )
        # Pre-norm leaves the residual stream un-normalised: one LayerNorm closes the stack.
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if norm_first else nn.Identity()


class TransformerEncoder(_LayerStack):
    """A stack of :class:`TransformerEncoderLayer`, with a final LayerNorm when ``norm_first``.

    Args:
        d_model: width ``D``.
        num_heads: attention heads.
        num_layers: number of layers.
        d_ff: hidden width of the feed-forward network.
        dropout: dropout on attention probabilities, residual branches and the FFN.
        norm_first: pre-norm (``True``) or the paper's post-norm (``False``).
        activation: ``"relu"`` (paper), ``"gelu"``, ``"quick_gelu"`` or a callable.
        layer_norm_eps: LayerNorm epsilon.
    """

    layer_cls = TransformerEncoderLayer

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """``x`` ``(B, L, D)``; ``key_padding_mask`` ``(B, L)`` bool, ``True`` = pad. Returns ``(B, L, D)``."""
        for layer in self.layers:
            x = layer(x, key_padding_mask=key_padding_mask, causal=causal)
        return self.norm(x)


class TransformerDecoder(_LayerStack):
    """A stack of :class:`TransformerDecoderLayer`, with a final LayerNorm when ``norm_first``.

    Takes the same arguments as :class:`TransformerEncoder`.
    """

    layer_cls = TransformerDecoderLayer

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Target ``x`` ``(B, T, D)``, encoder output ``memory`` ``(B, S, D)`` -> ``(B, T, D)``."""
        for layer in self.layers:
            x = layer(x, memory, tgt_key_padding_mask, memory_key_padding_mask, causal)
        return self.norm(x)


class Transformer(nn.Module):
    """The full encoder-decoder for sequence-to-sequence tasks (translation, sequence reversal).

    Args:
        src_vocab: source vocabulary size.
        tgt_vocab: target vocabulary size.
        d_model: width ``D`` (512 in the paper's base model).
        num_heads: attention heads (8).
        num_encoder_layers: encoder depth (6).
        num_decoder_layers: decoder depth (6).
        d_ff: feed-forward hidden width (2048).
        dropout: dropout rate (0.1).
        norm_first: pre-norm instead of the paper's post-norm.
        max_len: longest sequence the sinusoidal table covers.
        pad_id: padding token id in both vocabularies; pad positions are masked out.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d_model: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        d_ff: int = 2048,
        dropout: float = 0.1,
        norm_first: bool = True,
        max_len: int = 512,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.pad_id = pad_id
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id)
        self.register_buffer("pos_table", sincos_1d(torch.arange(max_len), d_model), persistent=False)  # (max_len, D)
        self.embed_drop = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(d_model, num_heads, num_encoder_layers, d_ff, dropout, norm_first)
        self.decoder = TransformerDecoder(d_model, num_heads, num_decoder_layers, d_ff, dropout, norm_first)
        self.generator = nn.Linear(d_model, tgt_vocab)
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.normal_(emb.weight, std=d_model**-0.5)  # times sqrt(D) below: unit-variance tokens
            with torch.no_grad():
                emb.weight[pad_id].zero_()

    def _embed(self, tokens: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        L = tokens.shape[1]
        if L > self.max_len:
            raise HistofmError(
                f"Sequence length {L} exceeds the model's max_len {self.max_len}; "
                "shorten the input or build the model with a larger max_len."
            )
        # The paper multiplies embeddings by sqrt(d_model) before adding positions.
        x = table(tokens) * math.sqrt(self.d_model) + self.pos_table[:L].to(table.weight.dtype)  # (B, L, D)
        return self.embed_drop(x)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source ids ``(B, S)`` -> memory ``(B, S, D)`` and its padding mask ``(B, S)``."""
        src_pad = src == self.pad_id
        return self.encoder(self._embed(src, self.src_embed), key_padding_mask=src_pad), src_pad

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor | None) -> torch.Tensor:
        """Target ids ``(B, T)`` (starting with BOS) -> next-token logits ``(B, T, V)``."""
        tgt_pad = tgt == self.pad_id
        h = self.decoder(self._embed(tgt, self.tgt_embed), memory, tgt_pad, memory_pad, causal=True)
        return self.generator(h)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``src`` ``(B, S)``, decoder input ``tgt`` ``(B, T)`` -> logits ``(B, T, V)``.

        Train with ``cross_entropy(logits, tgt_out, ignore_index=pad_id)`` where
        ``tgt`` is ``[BOS, y_1, ..., y_n]`` and ``tgt_out`` is ``[y_1, ..., y_n, EOS]``.
        """
        memory, src_pad = self.encode(src)
        return self.decode(tgt, memory, src_pad)

    @torch.no_grad()
    def generate_greedy(self, src: torch.Tensor, max_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
        """Decode by taking the most likely token at every step.

        Args:
            src: source ids ``(B, S)``, padded with ``pad_id``.
            max_len: most tokens to generate after BOS.
            bos_id: start-of-sequence id fed first.
            eos_id: end-of-sequence id; a finished sequence is padded with ``pad_id``.

        Returns:
            ``(B, 1 + n)`` ids starting with BOS, ``n <= max_len``.
        """
        memory, src_pad = self.encode(src)
        B = src.shape[0]
        out = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            logits = self.decode(out, memory, src_pad)[:, -1]  # (B, V): only the newest position
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done = done | (nxt == eos_id)
            if bool(done.all()):
                break
        return out
