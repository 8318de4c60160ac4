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

``prov_gigapath_slide`` is the slide encoder (``gigapath_slide_enc12l768d``): a 12-layer,
768-wide LongNet over the tile embeddings, registered with
:func:`~histofm.registry.register_slide_encoder` (see :mod:`histofm.models.slide_encoder`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from histofm._registry import ModelInfo, SlideEncoderInfo, register_model, register_slide_encoder
from histofm.models.slide_encoder import GIGAPATH_DILATIONS, GigaPathSlideEncoder, gigapath_segment_lengths
from histofm.models.vit import VisionTransformer
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


PROV_GIGAPATH_SLIDE = SlideEncoderInfo(
    name="prov_gigapath_slide",
    arch="LongNet 12L/768d, 16 heads, dilated attention",
    arch_kwargs=dict(
        in_chans=1536, embed_dim=768, depth=12, num_heads=16, mlp_ratio=4.0, slide_ngrids=1000, tile_size=256,
        segment_lengths=tuple(gigapath_segment_lengths(262144, 256)), dilations=GIGAPATH_DILATIONS,
        global_pool=False,
    ),
    embed_dim=768,
    embedding="class token after LongNet's final LayerNorm and the head LayerNorm (official forward)",
    hub_id="prov-gigapath/prov-gigapath",
    hub_filename="slide_encoder.pth",
    gated=True,
    license="Apache-2.0",
    paper="Nature 2024 (Xu et al.)",
    method="masked autoencoder over tile embeddings (LongNet), then fine-tuning",
    data="171,189 WSIs (Providence) [S]",
    num_params=86_330_880,
    tile_encoder="prov_gigapath",
    in_dim=1536,
    tile_px=256,
    mpp=0.5,
    verified=(
        "layer layout and names: parity with torchscale 0.3.0 Encoder where dilated attention is full attention; "
        "dilated attention: parity with a loop reference written from the paper's equations; position table: "
        "lightly's MAE 2-D sine-cosine table; not checked against the released weights"
    ),
)


def _gigapath_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``slide_encoder.pth`` uses our names; only the fixed position table (if saved) is recomputed, not loaded."""
    return {k: v for k, v in sd.items() if k != "pos_embed"}


@register_slide_encoder(info=PROV_GIGAPATH_SLIDE, filter_fn=_gigapath_filter)
def prov_gigapath_slide(**kwargs: Any) -> GigaPathSlideEncoder:
    """Prov-GigaPath slide encoder; ``model(features, coords)`` is the 768-d slide embedding."""
    return GigaPathSlideEncoder(**{**PROV_GIGAPATH_SLIDE.arch_kwargs, **kwargs})
