"""Mahmood Lab's UNI (ViT-L/16) and UNI2-h (ViT-H/14 with registers) tile encoders.

UNI (Chen et al. 2024, Nature Medicine; arXiv 2308.15474) is a ViT-L/16 trained
with DINOv2 on Mass-100K (100,426 WSIs, ~100M tiles at 20x). UNI2-h is its
successor on the hub: 24 blocks of width 1536 with 24 heads (timm's "giant"
builder), a packed SwiGLU feed-forward (``fc1: 1536 -> 8192``, ``fc2: 4096 -> 1536``),
8 register tokens and a position table over patches only (``no_embed_class``).

Both embed a tile as the class token after the final LayerNorm::

    e = LN(ViT(x))[:, 0]          # 1024 (UNI) or 1536 (UNI2-h)

The hub files are timm ``VisionTransformer`` checkpoints (``pytorch_model.bin``)
and load as-is. UNI2-h's training-set figures come from its model card, not a
paper [U].
"""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo, register_model
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import arxiv, build_vit

UNI = ModelInfo(
    name="uni",
    arch="ViT-L/16",
    arch_kwargs=dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
    embed_dim=1024,
    embedding="class token after the final norm",
    hub_id="MahmoodLab/UNI",
    hub_filename="pytorch_model.bin",
    gated=True,
    license="CC-BY-NC-ND-4.0",
    paper=arxiv("2308.15474"),
    method="DINOv2",
    data="Mass-100K: 100,426 WSIs, ~100M tiles at 20x",
    num_params=303_350_784,
    pretrain_config="dinov2",
)

UNI2_H = ModelInfo(
    name="uni2_h",
    arch="ViT-H/14 + 8 registers, SwiGLU",
    arch_kwargs=dict(
        img_size=224, patch_size=14, embed_dim=1536, depth=24, num_heads=24, mlp_ratio=5.33334,
        mlp_layer="swiglu", init_values=1e-5, reg_tokens=8, no_embed_class=True,
    ),
    embed_dim=1536,
    embedding="class token after the final norm",
    hub_id="MahmoodLab/UNI2-h",
    hub_filename="pytorch_model.bin",
    gated=True,
    license="CC-BY-NC-ND-4.0",
    paper=arxiv("2308.15474"),
    method="DINOv2",
    data=">200M tiles from >350k WSIs (H&E and IHC) [U: model card]",
    num_params=681_394_176,
    pretrain_config="dinov2",
)


@register_model(info=UNI)
def uni(**kwargs: Any) -> VisionTransformer:
    """UNI ViT-L/16; ``model(x)`` is the 1024-d class token."""
    return build_vit(UNI, kwargs)


@register_model(info=UNI2_H)
def uni2_h(**kwargs: Any) -> VisionTransformer:
    """UNI2-h, 24 blocks x 1536 with 8 registers; ``model(x)`` is the 1536-d class token."""
    return build_vit(UNI2_H, kwargs)
