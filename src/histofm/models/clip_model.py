"""A CLIP image-text model in open_clip's layout: ``encode_image``, ``encode_text``, ``logit_scale``.

The image tower is CLIP's ViT (Radford et al. 2021, arXiv 2103.00020): patches
by a bias-free convolution, a class embedding, learned positions, a LayerNorm
*before* the blocks (``ln_pre``, which timm's ViT lacks), the blocks, ``ln_post``
on the class token and a projection ``proj`` ``(W, E)``::

    x = [c; conv1(img)] + P;  x = Blocks(ln_pre(x));  i = ln_post(x[:, 0]) @ proj    # (B, E)

The text tower is :class:`~histofm.models.text.TextTransformer`. Zero-shot and
retrieval compare L2-normalised embeddings; ``exp(logit_scale)`` (the learned
inverse temperature, at most 100) turns cosine similarities into logits.

Parameter names: ``visual.{conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N.*, ln_post, proj}``, ``text.*`` and ``logit_scale``.
open_clip's own CLIP keeps its text tower at the top level (``token_embedding``,
``transformer``, ...): :func:`histofm.zoo.vl.openclip_filter` adds the ``text.``
prefix, and the Hugging Face ``CLIPModel`` layout is converted there as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histofm.layers.pos_embed import resample_abs_pos_embed
from histofm.models.text import TextTransformer, Transformer


class VisionTower(nn.Module):
    """CLIP's ViT image tower; ``forward(images (B, 3, H, W)) -> (B, E)``."""

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 32,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        embed_dim: int = 512,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the blocks, ``(B, 1 + N, W)`` (no ``ln_post``)."""
        x = self.conv1(images)  # (B, W, h, w)
        B, W, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        pos = self.positional_embedding.unsqueeze(0)
        if (h, w) != (self.grid, self.grid):
            pos = resample_abs_pos_embed(pos, new_size=(h, w), old_size=(self.grid, self.grid), num_prefix_tokens=1)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, W), x], 1) + pos
        return self.transformer(self.ln_pre(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.forward_features(images)[:, 0]) @ self.proj


class CLIPModel(nn.Module):
    """Image tower + text tower + learned temperature.

    Args:
        visual: an image tower mapping ``(B, 3, H, W)`` to ``(B, E)``.
        text: a :class:`TextTransformer` with the same ``E``.
        init_logit_scale: initial ``exp(logit_scale)`` (CLIP: 1 / 0.07).
    """

    kind = "vision-language"

    def __init__(self, visual: nn.Module, text: TextTransformer, init_logit_scale: float = 1 / 0.07) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)).log())

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(B, E)``; ``normalize`` divides by their L2 norm."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(B, E)`` of token ids ``(B, L)`` from ``histofm.tokenize(texts, model=NAME)``."""
        x = self.text(tokens)[0]
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``model(images)``: image embeddings ``(B, E)``; ``model(images, tokens)``: logits ``(B_i, B_t)``.

        The logits are ``exp(logit_scale) * cos(image, text)``; their transpose scores texts against images.
        """
        if tokens is None:
            return self.encode_image(images)
        return self.logit_scale.exp() * self.encode_image(images, True) @ self.encode_text(tokens, True).T
