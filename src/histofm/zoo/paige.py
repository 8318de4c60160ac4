"""Paige's Virchow family: ViT-H/14 (Virchow, Virchow2) and ViT-G/14 (Virchow2G) tile encoders.

Virchow (Vorontsov et al. 2023, arXiv 2309.07778) is a ViT-H/14 with a packed
SwiGLU feed-forward (SiLU gate, ``fc1: 1280 -> 6832``, ``fc2: 3416 -> 1280``) and
LayerScale, trained with DINOv2 on ~1.5M MSKCC slides. Virchow2 and Virchow2G
(Zimmermann et al. 2024, arXiv 2408.00738) add 4 / 8 register tokens, train on
3.1M slides at mixed magnifications, and replace DINOv2's KoLeo term with a kernel
density estimator (KDE) regulariser and crop-and-resize with "extended-context
translation" crops.

The embedding is the class token concatenated with the mean of the patch tokens,
registers excluded (2 x 1280 = 2560)::

    e = [ z_cls ; (1/N) sum_i z_i ]     with z = LN(ViT(x)), i over patch tokens

Checkpoints on the hub are timm ``VisionTransformer`` files (``pytorch_model.bin``)
and load as-is. Virchow2G has no public weights: the architecture here is our
reading of "ViT-G/14" (Zhai et al. 2022 width 1664, depth 48, 16 heads) with a
SwiGLU sized to keep ViT-G's MLP parameter budget (2/3 x 8192, rounded to 5464)
and LayerScale, which gives 1.84B parameters against the ~1.9B reported; all of
these Virchow2G details are unverified [U].
"""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo, register_model
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import arxiv, build_vit

_VIRCHOW_ARCH = dict(
    img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
    mlp_ratio=5.3375, mlp_layer="swiglu", init_values=1e-5, global_pool="token_avg",
)

VIRCHOW = ModelInfo(
    name="virchow",
    arch="ViT-H/14, SwiGLU",
    arch_kwargs=_VIRCHOW_ARCH,
    embed_dim=2560,
    embedding="class token ++ mean of patch tokens (after final norm), 2 x 1280",
    hub_id="paige-ai/Virchow",
    hub_filename="pytorch_model.bin",
    gated=True,
    license="Apache-2.0",
    paper=arxiv("2309.07778"),
    method="DINOv2",
    data="~1.5M WSIs (1,488,550; MSKCC), 20x tiles",
    num_params=631_229_184,
    pretrain_config="dinov2",
)

VIRCHOW2 = ModelInfo(
    name="virchow2",
    arch="ViT-H/14 + 4 registers, SwiGLU",
    arch_kwargs={**_VIRCHOW_ARCH, "reg_tokens": 4},
    embed_dim=2560,
    embedding="class token ++ mean of patch tokens (registers excluded), 2 x 1280",
    hub_id="paige-ai/Virchow2",
    hub_filename="pytorch_model.bin",
    gated=True,
    license="CC-BY-NC-ND-4.0",
    paper=arxiv("2408.00738"),
    method="DINOv2 + KDE regulariser, extended-context translation crops",
    data="3.1M WSIs (3,134,922), mixed 5x/10x/20x/40x",
    num_params=631_239_424,
    pretrain_config="virchow2",
)

VIRCHOW2G = ModelInfo(
    name="virchow2g",
    arch="ViT-G/14 + 8 registers, SwiGLU [U]",
    arch_kwargs=dict(
        img_size=224, patch_size=14, embed_dim=1664, depth=48, num_heads=16,
        mlp_ratio=10928 / 1664, mlp_layer="swiglu", init_values=1e-5, reg_tokens=8,
        global_pool="token_avg",
    ),
    embed_dim=3328,
    embedding="class token ++ mean of patch tokens (registers excluded), 2 x 1664",
    public_weights=False,
    license="n/a (no public weights)",
    paper=arxiv("2408.00738"),
    method="DINOv2 + KDE regulariser, extended-context translation crops",
    data="3.1M WSIs (3,134,922), mixed 5x/10x/20x/40x",
    num_params=1_843_732_352,
    pretrain_config="virchow2",
    notes="No public weights; width/depth/heads/MLP size/LayerScale of ViT-G/14 are our reading [U].",
)


@register_model(info=VIRCHOW)
def virchow(**kwargs: Any) -> VisionTransformer:
    """Virchow ViT-H/14; ``model(x)`` is the 2560-d class-token ++ patch-mean embedding."""
    return build_vit(VIRCHOW, kwargs)


@register_model(info=VIRCHOW2)
def virchow2(**kwargs: Any) -> VisionTransformer:
    """Virchow2 ViT-H/14 with 4 registers; registers are excluded from the patch mean."""
    return build_vit(VIRCHOW2, kwargs)


@register_model(info=VIRCHOW2G)
def virchow2g(**kwargs: Any) -> VisionTransformer:
    """Virchow2G ViT-G/14 with 8 registers: architecture only, no public weights [U]."""
    return build_vit(VIRCHOW2G, kwargs)
