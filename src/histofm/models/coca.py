"""CoCa, contrastive captioners (Yu et al. 2022, arXiv 2205.01917), in CONCH's checkpoint layout.

CoCa trains one image encoder and one text decoder with two losses at once. The
text decoder is split: its lower half (the *unimodal* text tower) sees only the
caption, under a causal mask, and a class token appended after the caption gives
the text embedding; its upper half (the *multimodal* decoder) adds
cross-attention to image tokens and predicts the next word::

    L = L_con + lambda * L_cap
    L_con = ( CE(s I T^T, arange) + CE(s T I^T, arange) ) / 2           # CLIP's InfoNCE
    L_cap = - sum_t log P(y_t | y_<t, image)                             # teacher-forced captioning

The image side pools the ViT's tokens with *attentional poolers*: learned
queries attend to the (LayerNormed) tokens. One query gives the contrastive
embedding (``attn_pool_contrast`` -> ``ln_contrast`` -> ``proj_contrast``), 256
queries give the tokens the decoder attends to (``attn_pool_caption`` ->
``ln_caption``).

CONCH (Lu et al. 2024, Nature Medicine; arXiv 2307.12914) is this model with a
timm ViT-B/16 trunk at 448 px (``visual.trunk.*``, loaded into our
:class:`~histofm.models.vit.VisionTransformer`), a 12-layer 768-wide text tower
over a 32,007-id vocabulary with a 128-position table, and a 12-layer
multimodal decoder. Following CONCH's code, ``encode_text`` drops the last input
id (the slot the class token takes) before the text tower.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.models.text import MultiheadAttention, ResidualAttentionBlock, TextTransformer, causal_mask
from histofm.models.vit import VisionTransformer


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries attend to tokens ``(B, N, C)`` -> ``(B, n_queries, D)``."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 256) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = MultiheadAttention(d_model, n_head, kdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(self.query).expand(x.shape[0], -1, -1)  # (B, Q, D)
        return self.attn(q, self.ln_k(x))


class CoCaVisual(nn.Module):
    """ViT trunk + attentional poolers; ``forward`` gives ``(contrastive (B, E), caption tokens (B, Q, Wc))``."""

    def __init__(
        self,
        trunk: VisionTransformer,
        embed_dim: int = 512,
        embed_dim_caption: int = 768,
        pooler_heads: int = 8,
        n_queries_contrast: int = 1,
        n_queries_caption: int = 256,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        width = trunk.embed_dim
        self.attn_pool_contrast = AttentionalPooler(embed_dim, width, pooler_heads, n_queries_contrast)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(embed_dim, embed_dim))
        self.attn_pool_caption = AttentionalPooler(embed_dim_caption, width, pooler_heads, n_queries_caption)
        self.ln_caption = nn.LayerNorm(embed_dim_caption)

    def forward(self, images: torch.Tensor, proj_contrast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.trunk.forward_features(images)  # (B, 1 + N, W) after the trunk's final norm
        pooled = self.ln_contrast(self.attn_pool_contrast(x)[:, 0])  # (B, E)
        if proj_contrast:
            pooled = pooled @ self.proj_contrast
        return pooled, self.ln_caption(self.attn_pool_caption(x))  # (B, E), (B, Q, Wc)


class MultimodalDecoder(nn.Module):
    """Causal self-attention blocks interleaved with cross-attention to image tokens; logits over the vocabulary."""

    def __init__(self, width: int = 768, layers: int = 12, heads: int = 12, vocab_size: int = 32007) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.cross_attn = nn.ModuleList(ResidualAttentionBlock(width, heads, cross_attention=True) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, vocab_size))
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, Q, W)``, text token features ``(B, L, W)`` -> logits ``(B, L, V)``."""
        mask = causal_mask(text_tokens.shape[1], text_tokens.device)
        x = text_tokens
        for block, cross in zip(self.resblocks, self.cross_attn):
            x = cross(block(x, mask), memory=image_tokens)
        return self.ln_final(x) @ self.text_projection


class CoCa(nn.Module):
    """CoCa with ``encode_image``, ``encode_text``, ``logit_scale`` and teacher-forced ``caption_logits``.

    Args:
        trunk: keyword arguments of the ViT trunk (:class:`VisionTransformer`).
        embed_dim: contrastive embedding size ``E``.
        embed_dim_caption: width of the caption-pooler tokens (= decoder width).
        text: keyword arguments of the unimodal :class:`TextTransformer` (``embed_cls=True``).
        decoder_layers, decoder_heads: the multimodal decoder (0 layers: none).
    """

    kind = "vision-language"

    def __init__(
        self,
        trunk: dict[str, Any],
        embed_dim: int = 512,
        embed_dim_caption: int = 768,
        text: dict[str, Any] | None = None,
        decoder_layers: int = 12,
        decoder_heads: int = 12,
        pooler_heads: int = 8,
        n_queries_caption: int = 256,
    ) -> None:
        super().__init__()
        text_kw = {"embed_cls": True, "embed_dim": embed_dim, **(text or {})}
        self.visual = CoCaVisual(
            VisionTransformer(**{"num_classes": 0, **trunk}), embed_dim, embed_dim_caption, pooler_heads,
            1, n_queries_caption,
        )
        self.text = TextTransformer(**text_kw)
        vocab = self.text.token_embedding.num_embeddings
        width = self.text.token_embedding.embedding_dim
        self.text_decoder = MultimodalDecoder(width, decoder_layers, decoder_heads, vocab) if decoder_layers else None
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    def encode_image(self, images: torch.Tensor, normalize: bool = False, proj_contrast: bool = True) -> torch.Tensor:
        """Contrastive image embeddings ``(B, E)``.

        ``proj_contrast=False`` stops before the last projection: the pooled feature CONCH's
        authors recommend as a tile embedding for supervised tasks.
        """
        x = self.visual(images, proj_contrast)[0]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(B, E)`` of ids ``(B, L)``; the last id (the class slot) is dropped, as CONCH does."""
        x = self.text(tokens[:, :-1])[0]
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``model(images)``: image embeddings ``(B, E)``; ``model(images, tokens)``: logits ``(B_i, B_t)``."""
        if tokens is None:
            return self.encode_image(images)
        return self.logit_scale.exp() * self.encode_image(images, True) @ self.encode_text(tokens, True).T

    def caption_logits(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, L-1, V)`` for ids ``(B, L)``: position ``t`` predicts ``tokens[:, t + 1]``."""
        if self.text_decoder is None:
            raise HistofmError("This CoCa has no multimodal decoder (decoder_layers=0); build it with decoder_layers >= 1 to caption.")
        _, image_tokens = self.visual(images)
        _, text_tokens = self.text(tokens[:, :-1])
        return self.text_decoder(image_tokens, text_tokens)


def coca_caption_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """``L_cap``: cross-entropy of ``logits`` ``(B, L-1, V)`` against ``tokens[:, 1:]``, padding ignored."""
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], ignore_index=pad_id)
