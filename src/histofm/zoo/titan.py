"""TITAN's slide encoder (Mahmood Lab): a ViT with 2-D ALiBi over CONCH v1.5 tile features.

Ding, Wagner et al. 2024, "Multimodal whole slide foundation model for pathology"
(arXiv 2411.19666). The hub repository ``MahmoodLab/TITAN`` (gated, CC-BY-NC-ND-4.0) holds
the vision tower, a text tower and CONCH v1.5 in one ``model.safetensors``; the loader keeps
the vision tower (:func:`histofm.models.titan.titan_checkpoint_filter`).

Status: unverified (no installable oracle; see :mod:`histofm.models.titan`).
"""

from __future__ import annotations

from typing import Any

from histofm._registry import SlideEncoderInfo, register_slide_encoder
from histofm.models.titan import TitanSlideEncoder, titan_checkpoint_filter

TITAN = SlideEncoderInfo(
    name="titan",
    arch="ViT 6L/768d, 12 heads, 2-D ALiBi, attentional pooling",
    arch_kwargs=dict(
        in_chans=768, embed_dim=768, depth=6, num_heads=12, mlp_ratio=4.0, tile_size=512,
        attentional_pool="parallel", pooler_heads=8,
    ),
    embed_dim=768,
    embedding="attentional pooler (1 query) over the normed tokens, before the text projection",
    hub_id="MahmoodLab/TITAN",
    hub_filename="model.safetensors",
    gated=True,
    license="CC-BY-NC-ND-4.0",
    paper="arXiv 2411.19666 (Ding et al.)",
    method="iBOT on feature grids, then vision-language alignment (CoCa)",
    data="335,645 WSIs (Mass-340K) [S]",
    num_params=46_076_160,
    tile_encoder="conch_v1_5",
    in_dim=768,
    tile_px=512,
    mpp=0.5,
    verified=(
        "unverified: no TITAN implementation is installable; tests check 2-D ALiBi values against hand-computed "
        "ones, the blocks against timm's Block with the same bias, order and translation invariance, and the "
        "official-name loader"
    ),
    notes="attentional_pool 'parallel' is read from the public code's defaults, not from the released config [U]",
)


@register_slide_encoder(info=TITAN, filter_fn=titan_checkpoint_filter)
def titan(**kwargs: Any) -> TitanSlideEncoder:
    """TITAN slide encoder; ``model(features, coords)`` is the 768-d slide embedding."""
    return TitanSlideEncoder(**{**TITAN.arch_kwargs, **kwargs})
