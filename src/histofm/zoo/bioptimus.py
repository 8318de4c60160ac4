"""Bioptimus' H-optimus-0 and H-optimus-1: ViT-g/14 with 4 registers (DINOv2 "giant2" layout).

H-optimus-0 and H-optimus-1 have no paper; the facts below come from their model
cards and the ``bioptimus/releases`` repository. Both are the DINOv2 ViT-g/14
with registers: 40 blocks of width 1536, 24 heads, packed SwiGLU
(``fc1: 1536 -> 8192``, ``fc2: 4096 -> 1536``), LayerScale, 4 register tokens and
a position table over the 16 x 16 patch grid only (``no_embed_class``), trained
with a DINOv2/iBOT recipe on >500k slides (H-optimus-1: over 1M slides [U]).
Their own normalisation statistics differ from ImageNet's. The embedding is the
class token after the final LayerNorm::

    e = LN(ViT(x))[:, 0]          # 1536

The hub files are timm ``VisionTransformer`` checkpoints (``pytorch_model.bin``,
~4.5 GB in fp32). Loading builds the model on the meta device and assigns the
file's (memory-mapped) tensors, so peak memory stays near one copy of the weights
(see ``benchmarks/load_memory.py``). Whether H-optimus-0 is gated is unverified [U];
H-optimus-1 is gated and its licence is non-commercial per its card [U].
"""

from __future__ import annotations

from typing import Any

from histofm._registry import ModelInfo, register_model
from histofm.models.vit import VisionTransformer
from histofm.zoo._common import build_vit

H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)

_ARCH = dict(
    img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
    mlp_layer="swiglu", init_values=1e-5, reg_tokens=4, no_embed_class=True,
)

H_OPTIMUS_0 = ModelInfo(
    name="h_optimus_0",
    arch="ViT-g/14 + 4 registers, SwiGLU",
    arch_kwargs=_ARCH,
    embed_dim=1536,
    embedding="class token after the final norm",
    mean=H_OPTIMUS_MEAN,
    std=H_OPTIMUS_STD,
    hub_id="bioptimus/H-optimus-0",
    hub_filename="pytorch_model.bin",
    gated=True,
    license="Apache-2.0",
    paper="none (model card)",
    method="DINOv2/iBOT",
    data=">500k WSIs",
    num_params=1_134_774_272,
    pretrain_config="dinov2",
    notes="Whether the hub repository is gated (access form) is unverified [U].",
)

H_OPTIMUS_1 = ModelInfo(
    name="h_optimus_1",
    arch="ViT-g/14 + 4 registers, SwiGLU",
    arch_kwargs=_ARCH,
    embed_dim=1536,
    embedding="class token after the final norm",
    mean=H_OPTIMUS_MEAN,
    std=H_OPTIMUS_STD,
    hub_id="bioptimus/H-optimus-1",
    hub_filename="pytorch_model.bin",
    gated=True,
    license="non-commercial (see model card) [U]",
    paper="none (model card)",
    method="DINOv2/iBOT",
    data=">1M WSIs [U]",
    num_params=1_134_774_272,
    pretrain_config="dinov2",
    notes="Gated on the hub; licence terms and training-set size are unverified [U].",
)


@register_model(info=H_OPTIMUS_0)
def h_optimus_0(**kwargs: Any) -> VisionTransformer:
    """H-optimus-0 ViT-g/14 with 4 registers; ``model(x)`` is the 1536-d class token."""
    return build_vit(H_OPTIMUS_0, kwargs)


@register_model(info=H_OPTIMUS_1)
def h_optimus_1(**kwargs: Any) -> VisionTransformer:
    """H-optimus-1: same architecture as H-optimus-0, new weights."""
    return build_vit(H_OPTIMUS_1, kwargs)
