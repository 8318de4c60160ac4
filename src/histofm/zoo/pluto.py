"""PathAI's PLUTO: a FlexiViT-S whose patch size is chosen at run time. No public weights.

PLUTO (Juyal et al. 2024, arXiv 2405.07905) is a ViT-S (width 384, 12 blocks,
6 heads, GELU MLP 1536, ~22M parameters) in the FlexiViT style (Beyer et al.
2023, arXiv 2212.08013): one set of weights serves patch sizes 8, 16 and 32, so
the same tile can be read at fine (28 x 28 tokens) or coarse (7 x 7) granularity.
It is pretrained with DINOv2/iBOT plus an MAE and a Fourier loss on 195M tiles
from 158k slides at 0.25/0.5/1/2 um/px.

The architecture, :class:`~histofm.models.flexivit.FlexiVisionTransformer`, lives in
``models/flexivit.py``; here it keeps one underlying patch kernel of 16 x 16 and one
position table of 14 x 14 (224 px), PI-resized for the other patch sizes.

Unverified [U]: the underlying kernel and grid sizes, register tokens (none
here), LayerScale (1e-5 here, the DINOv2 default), and the normalisation
statistics (ImageNet here). Only the architecture is provided.
"""

from __future__ import annotations

from typing import Any

import torch

from histofm._registry import ModelInfo, register_model
from histofm.layers.patch_embed import resize_patch_embed
from histofm.models.flexivit import FlexiVisionTransformer
from histofm.zoo._common import arxiv

StateDict = dict[str, torch.Tensor]


def _pluto_filter(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """Bring a FlexiViT checkpoint stored with another underlying kernel size to ours (PI-resize)."""
    key = "patch_embed.proj.weight"
    base = getattr(model, "base_patch_size", None)
    if key in sd and base is not None and tuple(sd[key].shape[-2:]) != (base, base):
        sd = dict(sd)
        sd[key] = resize_patch_embed(sd[key], (base, base))
    return sd


PLUTO = ModelInfo(
    name="pluto",
    arch="FlexiViT-S (patch 8/16/32)",
    arch_kwargs=dict(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, init_values=1e-5,
        patch_sizes=(8, 16, 32),
    ),
    embed_dim=384,
    embedding="class token after the final norm (any patch size)",
    public_weights=False,
    license="n/a (no public weights)",
    paper=arxiv("2405.07905"),
    method="DINOv2/iBOT + MAE + Fourier loss, FlexiViT patch sizes, multi-scale tiles",
    data="195M tiles from 158k WSIs at 0.25/0.5/1/2 um/px",
    num_params=21_674_880,
    pretrain_config="pluto",
    notes="No public weights; kernel/grid sizes, registers, LayerScale and mean/std are assumptions [U].",
)


@register_model(info=PLUTO, filter_fn=_pluto_filter)
def pluto(**kwargs: Any) -> FlexiVisionTransformer:
    """PLUTO FlexiViT-S; choose the patch size with ``model(x, patch_size=8)`` or ``set_patch_size``."""
    return FlexiVisionTransformer(**{**PLUTO.arch_kwargs, **kwargs})
