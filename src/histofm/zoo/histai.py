"""HistAI's Hibou-B: a DINOv2 ViT-B/14 with 4 registers and a SwiGLU feed-forward.

Hibou (Nechaev et al. 2024, arXiv 2406.05074) trains ViTs with DINOv2 on a large
private slide collection. The hub's ``histai/hibou-b`` is a transformers model
with custom code (``Dinov2ModelWithRegisters``); its ``config.json`` [P] says:
width 768, 12 blocks, 12 heads, patch 14, image 224, 4 register tokens,
``use_swiglu_ffn: true``, LayerScale, LayerNorm eps 1e-6. With transformers'
DINOv2 SwiGLU rule the hidden size is ``round8(2/3 * 4 * 768) = 2048``, so
``weights_in: 768 -> 4096`` (packed, first half gated by SiLU) and
``weights_out: 2048 -> 768``: exactly our packed SwiGLU with ``mlp_ratio`` 5.33334.

The key names of the custom code are taken to be those of transformers'
``Dinov2WithRegistersModel`` (``embeddings.register_tokens``,
``mlp.weights_in`` / ``mlp.weights_out``, ``layer_scale*.lambda1``), which a
third-party converter also uses [S]; the custom modelling file itself was not
read, so identity with it is unverified [U]. Registers carry no position: the
class-token row of the HF position table is folded into ``cls_token``.

The embedding is the pooler output of the HF model, i.e. the class token after
the final LayerNorm::

    e = LN(ViT(x))[:, 0]          # 768

Preprocessing uses Hibou's statistics; resizing to 224 is assumed [U].
"""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo, register_model
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import arxiv, build_vit
from histofm.zoo._hf import convert_hf_vit, hf_config_overrides

HIBOU_B = ModelInfo(
    name="hibou_b",
    arch="ViT-B/14 + 4 registers, SwiGLU",
    arch_kwargs=dict(
        img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_ratio=5.33334,
        mlp_layer="swiglu", init_values=1e-5, reg_tokens=4, no_embed_class=True, use_mask_token=True,
    ),
    embed_dim=768,
    embedding="class token after the final norm (HF pooler output)",
    mean=(0.7068, 0.5755, 0.722),
    std=(0.195, 0.2316, 0.1816),
    hub_id="histai/hibou-b",
    gated=False,
    license="Apache-2.0",
    paper=arxiv("2406.05074"),
    method="DINOv2",
    data="private slide collection (~1M WSIs) [U]",
    num_params=85_740_288,
    pretrain_config="dinov2",
    notes=(
        "Key names assumed equal to transformers' Dinov2WithRegistersModel [U]; eval resize to 224 assumed [U]; "
        "parameter count is one 768-vector below the hub's (class position folded into cls_token)."
    ),
)


@register_model(info=HIBOU_B, filter_fn=convert_hf_vit, config_fn=hf_config_overrides)
def hibou_b(**kwargs: Any) -> VisionTransformer:
    """Hibou-B ViT-B/14 with 4 registers; loads the hub's transformers snapshot directly."""
    return build_vit(HIBOU_B, kwargs)
