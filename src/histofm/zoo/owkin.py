"""Owkin's Phikon (ViT-B/16, iBOT) and Phikon-v2 (ViT-L/16, DINOv2), published as transformers models.

Phikon (Filiot et al. 2023, medRxiv 10.1101/2023.07.21.23292757) is a ViT-B/16
trained with iBOT on 43M tiles from 6,093 TCGA slides; Phikon-v2 (Filiot et al.
2024, arXiv 2409.09173) is a ViT-L/16 with LayerScale trained with DINOv2 on
~456M tiles from ~60k slides. Both embed a tile as the class token after the
final LayerNorm, i.e. transformers' ``last_hidden_state[:, 0]``::

    e = LN(ViT(x))[:, 0]          # 768 (Phikon) or 1024 (Phikon-v2)

The hub holds ``ViTModel`` / ``Dinov2Model`` snapshots; pass the snapshot folder
(``config.json`` + ``model.safetensors``) as ``checkpoint_path``. Names are mapped
by :func:`histofm.zoo._hf.convert_hf_vit`; the LayerNorm epsilon is read from
``config.json`` (Phikon's early revisions used 1e-12, later ones 1e-6). The
``pooler`` of ``ViTModel`` is not part of the embedding and is dropped. Phikon-v2
keeps DINOv2's ``mask_token`` (so its parameter count matches the hub's).
The eval preprocessing (resize to 224, ImageNet statistics) follows the hub's
image processors; the resize mode is unverified [U].
"""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo, register_model
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import arxiv, build_vit
from histofm.zoo._hf import convert_hf_vit, hf_config_overrides

PHIKON = ModelInfo(
    name="phikon",
    arch="ViT-B/16",
    arch_kwargs=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    embed_dim=768,
    embedding="class token after the final norm (last_hidden_state[:, 0])",
    hub_id="owkin/phikon",
    gated=False,
    license="Owkin non-commercial",
    paper="medRxiv 10.1101/2023.07.21.23292757",
    method="iBOT",
    data="6,093 TCGA WSIs, 43M tiles",
    num_params=85_798_656,
    pretrain_config="ibot",
    notes="Eval resize mode (resize to 224, bicubic) is assumed from the hub image processor [U].",
)

PHIKON_V2 = ModelInfo(
    name="phikon_v2",
    arch="ViT-L/16",
    arch_kwargs=dict(
        img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
        use_mask_token=True,
    ),
    embed_dim=1024,
    embedding="class token after the final norm (last_hidden_state[:, 0])",
    hub_id="owkin/phikon-v2",
    gated=False,
    license="Owkin non-commercial",
    paper=arxiv("2409.09173"),
    method="DINOv2",
    data="~60k WSIs (58,359), ~456M tiles (PANCAN-XL)",
    num_params=303_351_808,
    pretrain_config="dinov2",
    notes="Eval resize mode (resize to 224, bicubic) is assumed from the hub image processor [U].",
)


@register_model(info=PHIKON, filter_fn=convert_hf_vit, config_fn=hf_config_overrides)
def phikon(**kwargs: Any) -> VisionTransformer:
    """Phikon ViT-B/16; loads the hub's ``ViTModel`` snapshot directly."""
    return build_vit(PHIKON, kwargs)


@register_model(info=PHIKON_V2, filter_fn=convert_hf_vit, config_fn=hf_config_overrides)
def phikon_v2(**kwargs: Any) -> VisionTransformer:
    """Phikon-v2 ViT-L/16; loads the hub's ``Dinov2Model`` snapshot directly."""
    return build_vit(PHIKON_V2, kwargs)
