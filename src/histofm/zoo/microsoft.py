"""Prov-GigaPath's tile encoder (Providence / Microsoft): a ViT-g with 16 px patches.

Prov-GigaPath (Xu et al. 2024, Nature, "A whole-slide foundation model for
digital pathology from real-world data") pairs a LongNet slide encoder with a
tile encoder; this entry is the tile encoder: the DINOv2 ViT-g layout (40 blocks,
width 1536, 24 heads, packed SwiGLU ``fc1: 1536 -> 8192``, LayerScale) with
16 px patches, no registers, and a position table that includes the class token
(1 + 14 x 14 rows). It was pretrained with DINOv2 on 1.3B tiles from 171,189
Providence slides [S]. Its preprocessing resizes the shorter side to 256
(bicubic) and centre-crops 224. The embedding is the class token::

    e = LN(ViT(x))[:, 0]          # 1536

The hub file is a timm ``VisionTransformer`` checkpoint (``pytorch_model.bin``).
"""

from __future__ import annotations

from typing import Any

from histofm.models.vit import VisionTransformer
from histofm.registry import ModelInfo, register_model
from histofm.zoo._common import build_vit

PROV_GIGAPATH = ModelInfo(
    name="prov_gigapath",
    arch="ViT-g/16, SwiGLU",
    arch_kwargs=dict(
        img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
        mlp_layer="swiglu", init_values=1e-5,
    ),
    embed_dim=1536,
    embedding="class token after the final norm",
    resize=256,
    interpolation="bicubic",
    hub_id="prov-gigapath/prov-gigapath",
    hub_filename="pytorch_model.bin",
    gated=True,
    license="Apache-2.0",
    paper="Nature 2024 (Xu et al.)",
    method="DINOv2",
    data="1.3B tiles from 171,189 WSIs (Providence) [S]",
    num_params=1_134_953_984,
    pretrain_config="dinov2",
)


@register_model(info=PROV_GIGAPATH)
def prov_gigapath(**kwargs: Any) -> VisionTransformer:
    """Prov-GigaPath tile encoder; ``model(x)`` is the 1536-d class token."""
    return build_vit(PROV_GIGAPATH, kwargs)
