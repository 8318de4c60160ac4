"""RudolfV (Aignostics): a ViT-L/14 trained with DINOv2 on pathologist-curated data. No public weights.

Dippel et al. 2024 (arXiv 2401.04079) train a ViT-L/14 with DINOv2 on 134k
slides covering 129 stains, grouping the data by pathologist-defined tissue and
stain categories and adding stain augmentation. Only the architecture is
registered here: width 1024, 24 blocks, 16 heads, GELU MLP x4, class token,
224 px input with a position table over class token + 16 x 16 patches.
LayerScale (1e-5, the DINOv2 default), the position-table layout and the
normalisation statistics (ImageNet assumed) are unverified [U]. The embedding is
the class token::

    e = LN(ViT(x))[:, 0]          # 1024
"""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo, register_model
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import arxiv, build_vit

RUDOLFV = ModelInfo(
    name="rudolfv",
    arch="ViT-L/14",
    arch_kwargs=dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
    embed_dim=1024,
    embedding="class token after the final norm",
    public_weights=False,
    license="n/a (no public weights)",
    paper=arxiv("2401.04079"),
    method="DINOv2 + pathologist-curated data groups + stain augmentation",
    data="134k WSIs (133,998), 129 stains",
    num_params=303_227_904,
    pretrain_config="dinov2",
    notes="No public weights; LayerScale, position layout and mean/std are assumptions [U].",
)


@register_model(info=RUDOLFV)
def rudolfv(**kwargs: Any) -> VisionTransformer:
    """RudolfV ViT-L/14: architecture only, no public weights."""
    return build_vit(RUDOLFV, kwargs)
