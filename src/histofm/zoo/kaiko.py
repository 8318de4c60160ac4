"""kaiko.ai's ViT-S and ViT-B tile encoders (patch 16 and 8).

"Towards Large-Scale Training of Pathology Foundation Models" (kaiko.ai et al.
2024, arXiv 2404.15217) trains plain timm ViTs (no registers, no LayerScale,
GELU MLP) with DINO on TCGA slides at several magnifications, and normalises
inputs with mean = std = 0.5 per channel. The embedding is the class token after
the final LayerNorm::

    e = LN(ViT(x))[:, 0]          # 384 (ViT-S) or 768 (ViT-B)

The official weights are distributed through ``torch.hub`` (github
kaiko-ai/towards_large_pathology_fms); ``hub_id`` names the timm-format mirror
on the Hugging Face hub (``1aurent/...``), which holds the same tensors under
timm names [S]. The training-set size is unverified [U].
"""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo, register_model
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import arxiv, build_vit

_HALF = (0.5, 0.5, 0.5)


def _info(name: str, arch: str, dim: int, heads: int, patch: int, params: int, timm_name: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        arch=arch,
        arch_kwargs=dict(img_size=224, patch_size=patch, embed_dim=dim, depth=12, num_heads=heads),
        embed_dim=dim,
        embedding="class token after the final norm",
        mean=_HALF,
        std=_HALF,
        hub_id=f"1aurent/{timm_name}.kaiko_ai_towards_large_pathology_fms",
        hub_filename="model.safetensors",
        gated=False,
        license="kaiko non-commercial",
        paper=arxiv("2404.15217"),
        method="DINO",
        data="TCGA WSIs at multiple magnifications [U: size]",
        num_params=params,
        pretrain_config="dino",
        notes="hub_id is the timm-format mirror of the official torch.hub weights.",
    )


KAIKO_VITS16 = _info("kaiko_vits16", "ViT-S/16", 384, 6, 16, 21_665_664, "vit_small_patch16_224")
KAIKO_VITS8 = _info("kaiko_vits8", "ViT-S/8", 384, 6, 8, 21_670_272, "vit_small_patch8_224")
KAIKO_VITB16 = _info("kaiko_vitb16", "ViT-B/16", 768, 12, 16, 85_798_656, "vit_base_patch16_224")
KAIKO_VITB8 = _info("kaiko_vitb8", "ViT-B/8", 768, 12, 8, 85_807_872, "vit_base_patch8_224")


@register_model(info=KAIKO_VITS16)
def kaiko_vits16(**kwargs: Any) -> VisionTransformer:
    """kaiko.ai ViT-S/16 (DINO, TCGA); 384-d class token."""
    return build_vit(KAIKO_VITS16, kwargs)


@register_model(info=KAIKO_VITS8)
def kaiko_vits8(**kwargs: Any) -> VisionTransformer:
    """kaiko.ai ViT-S/8 (DINO, TCGA); 384-d class token."""
    return build_vit(KAIKO_VITS8, kwargs)


@register_model(info=KAIKO_VITB16)
def kaiko_vitb16(**kwargs: Any) -> VisionTransformer:
    """kaiko.ai ViT-B/16 (DINO, TCGA); 768-d class token."""
    return build_vit(KAIKO_VITB16, kwargs)


@register_model(info=KAIKO_VITB8)
def kaiko_vitb8(**kwargs: Any) -> VisionTransformer:
    """kaiko.ai ViT-B/8 (DINO, TCGA); 768-d class token."""
    return build_vit(KAIKO_VITB8, kwargs)
