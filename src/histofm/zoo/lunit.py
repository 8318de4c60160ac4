"""Lunit's DINO ViT-S/16 and ViT-S/8 from "Benchmarking Self-Supervised Learning on Diverse Pathology Datasets".

Kang et al. (CVPR 2023, arXiv 2212.04690) pretrain ViT-S (384 wide, 12 blocks,
6 heads, GELU MLP, no LayerScale, no registers) with DINO on ~33M tiles from
TCGA and in-house slides at 20x and 40x, and normalise with their own dataset
statistics. The embedding is the class token after the final LayerNorm::

    e = LN(ViT(x))[:, 0]          # 384

The official weights are released on github (lunit-io/benchmark-ssl-pathology);
``hub_id`` names the timm-format mirror on the Hugging Face hub (``1aurent/...``) [S].
"""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo, register_model
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import arxiv, build_vit

LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)


def _info(name: str, patch: int, params: int) -> ModelInfo:
    return ModelInfo(
        name=name,
        arch=f"ViT-S/{patch}",
        arch_kwargs=dict(img_size=224, patch_size=patch, embed_dim=384, depth=12, num_heads=6),
        embed_dim=384,
        embedding="class token after the final norm",
        mean=LUNIT_MEAN,
        std=LUNIT_STD,
        hub_id=f"1aurent/vit_small_patch{patch}_224.lunit_dino",
        hub_filename="model.safetensors",
        gated=False,
        license="Lunit non-commercial",
        paper=arxiv("2212.04690"),
        method="DINO",
        data="~33M tiles (TCGA + in-house), 20x and 40x [S]",
        num_params=params,
        pretrain_config="dino",
        notes="hub_id is the timm-format mirror of the official github release.",
    )


LUNIT_VITS16 = _info("lunit_vits16", 16, 21_665_664)
LUNIT_VITS8 = _info("lunit_vits8", 8, 21_670_272)


@register_model(info=LUNIT_VITS16)
def lunit_vits16(**kwargs: Any) -> VisionTransformer:
    """Lunit DINO ViT-S/16; 384-d class token."""
    return build_vit(LUNIT_VITS16, kwargs)


@register_model(info=LUNIT_VITS8)
def lunit_vits8(**kwargs: Any) -> VisionTransformer:
    """Lunit DINO ViT-S/8; 384-d class token."""
    return build_vit(LUNIT_VITS8, kwargs)
