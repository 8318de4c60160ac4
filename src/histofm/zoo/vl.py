"""Pathology vision-language models: PLIP, QuiltNet and CONCH, with their checkpoint converters.

These are not tile encoders: each maps images *and* text into one embedding
space (``model.encode_image(images)``, ``model.encode_text(histofm.tokenize(texts,
model=NAME))``, ``model.logit_scale``), and their records say ``kind="vision-language"``.
``embed_dim`` is the size of that joint space.

* **PLIP** (Huang et al. 2023, Nature Medicine, "A visual-language foundation
  model for pathology image analysis using medical Twitter"): OpenAI CLIP
  ViT-B/32 fine-tuned on 208,414 pathology image-text pairs from Twitter
  (OpenPath). The hub holds a Hugging Face ``CLIPModel``
  (``vision_model.*``, ``text_model.*``, ``visual_projection``, ``text_projection``);
  :func:`hf_clip_filter` converts it. QuickGELU (OpenAI's activation). Its
  tokenizer is HF's ``CLIPTokenizer``: the same BPE, padded with EOT.
* **QuiltNet-B-32** (Ikezogwo et al. 2023, NeurIPS datasets track, arXiv
  2306.11207): open_clip ViT-B/32 (GELU) trained on Quilt-1M, 1M image-text pairs
  mostly from narrated YouTube histopathology videos. open_clip layout
  (``open_clip_pytorch_model.bin``); :func:`openclip_filter` moves the top-level
  text tower under ``text.``.
* **CONCH** (Lu et al. 2024, Nature Medicine; arXiv 2307.12914): CoCa with a
  ViT-B/16 trunk at 448 px, trained on 1.17M pathology image-caption pairs. The
  official ``pytorch_model.bin`` (``visual.trunk.*``, ``visual.attn_pool_*``,
  ``text.*``, ``text_decoder.*``, ``logit_scale``) loads as-is. Its tokenizer is its
  own 32,007-id byte-level BPE, not bundled here: ``histofm.tokenize(texts,
  model="conch", tokenizer_file=...)``.

Image preprocessing: resize the shorter side, centre crop, OpenAI CLIP's mean
and std. Figures on training data come from the papers [S].
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from histofm._registry import ModelInfo, register_model
from histofm.models.clip_model import CLIPModel, VisionTower
from histofm.models.coca import CoCa
from histofm.models.text import TextTransformer
from histofm.zoo._common import arxiv

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

StateDict = dict[str, torch.Tensor]

_B32 = dict(
    vision=dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, embed_dim=512),
    text=dict(vocab_size=49408, context_length=77, width=512, heads=8, layers=12, embed_dim=512),
)

PLIP = ModelInfo(
    name="plip",
    arch="CLIP ViT-B/32 (HF CLIPModel), QuickGELU",
    arch_kwargs=dict(_B32, act="quick_gelu"),
    embed_dim=512,
    embedding="joint image-text space: encode_image / encode_text (L2-normalise before comparing)",
    mean=OPENAI_MEAN,
    std=OPENAI_STD,
    resize=224,
    hub_id="vinid/plip",
    hub_filename="pytorch_model.bin",
    license="MIT [U: model card]",
    paper="Nature Medicine 2023 (Huang et al.)",
    method="CLIP fine-tuning from OpenAI ViT-B/32",
    data="OpenPath: 208,414 pathology image-text pairs from Twitter [S]",
    num_params=151_277_313,
    kind="vision-language",
    text={"tokenizer": "clip_bpe", "context_length": 77, "pad": "eot"},
    notes="verified: key conversion and outputs equal transformers' CLIPModel (random weights, official layout).",
)

QUILTNET_B32 = ModelInfo(
    name="quiltnet_b32",
    arch="CLIP ViT-B/32 (open_clip)",
    arch_kwargs=dict(_B32, act="gelu"),
    embed_dim=512,
    embedding="joint image-text space: encode_image / encode_text (L2-normalise before comparing)",
    mean=OPENAI_MEAN,
    std=OPENAI_STD,
    resize=224,
    hub_id="wisdomik/QuiltNet-B-32",
    hub_filename="open_clip_pytorch_model.bin",
    license="MIT",
    paper=arxiv("2306.11207"),
    method="CLIP (open_clip), from OpenAI ViT-B/32",
    data="Quilt-1M: ~1M image-text pairs, mostly narrated YouTube histopathology videos [S]",
    num_params=151_277_313,
    kind="vision-language",
    text={"tokenizer": "clip_bpe", "context_length": 77, "pad": "zero"},
    notes="verified: keys load strictly and outputs equal open_clip's ViT-B-32 (random weights, official layout).",
)

CONCH = ModelInfo(
    name="conch",
    arch="CoCa: ViT-B/16 @448 + attentional poolers, 12-layer text tower, 12-layer decoder",
    arch_kwargs=dict(
        trunk=dict(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12),
        embed_dim=512,
        embed_dim_caption=768,
        text=dict(vocab_size=32007, context_length=128, width=768, heads=12, layers=12),
        decoder_layers=12,
        decoder_heads=12,
    ),
    embed_dim=512,
    embedding="contrastive image embedding (attentional pooler, proj_contrast); encode_text for prompts",
    input_size=(3, 448, 448),
    mean=OPENAI_MEAN,
    std=OPENAI_STD,
    resize=448,
    hub_id="MahmoodLab/CONCH",
    hub_filename="pytorch_model.bin",
    gated=True,
    license="CC-BY-NC-ND-4.0",
    paper=arxiv("2307.12914"),
    method="CoCa (contrastive + captioning)",
    data="1.17M pathology image-caption pairs [S]",
    num_params=395_232_769,
    kind="vision-language",
    text={"tokenizer": "hf_json", "context_length": 128},
    notes=(
        "verified against open_clip/timm parts in CONCH's configuration: trunk (timm ViT), attentional poolers, "
        "text tower with class token (open_clip legacy cls mask), multimodal decoder, composed encode_image / "
        "encode_text / caption logits. Tokenizer vocabulary not bundled; checked on a test-built vocabulary only."
    ),
)


# ------------------------------------------------------------------ checkpoint converters
def openclip_filter(sd: StateDict, model: nn.Module) -> StateDict:
    """open_clip ``CLIP`` -> ours: the top-level text tower goes under ``text.``; cached masks dropped."""
    out = {}
    for k, v in sd.items():
        if k == "attn_mask" or k.endswith(".attn_mask"):
            continue
        out[k if k.startswith("visual.") or k == "logit_scale" else f"text.{k}"] = v
    return out


def conch_filter(sd: StateDict, model: nn.Module) -> StateDict:
    """CONCH's checkpoint already has our names; cached causal masks are dropped."""
    return {k: v for k, v in sd.items() if not k.endswith("attn_mask")}


_HF_BLOCK = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TOP = {
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}


def hf_clip_filter(sd: StateDict, model: nn.Module) -> StateDict:
    """Hugging Face ``CLIPModel`` -> ours: q/k/v packed into ``in_proj``, projections transposed to ``(W, E)``."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.T.contiguous()  # Linear (E, W) -> (W, E)
        elif k == "text_projection.weight":
            out["text.text_projection"] = v.T.contiguous()
        elif m := re.match(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$", k):
            tower = "text" if m[1] == "text" else "visual"
            prefix = f"{tower}.transformer.resblocks.{m[2]}."
            rest = m[3]
            if q := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                qkv.setdefault(f"{prefix}attn.in_proj_{q[2]}", {})[q[1]] = v
                continue
            for src, dst in _HF_BLOCK.items():
                if rest.startswith(src + "."):
                    rest = dst + rest[len(src) :]
                    break
            out[prefix + rest] = v
        else:
            out[k] = v  # unknown: reported by the strict load
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            out[key] = next(iter(parts.values()))  # incomplete: let the shape / key check report it
            continue
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# ------------------------------------------------------------------ entries
def _merge(info: ModelInfo, overrides: dict[str, Any]) -> dict[str, Any]:
    """Registered arguments with overrides; dict-valued ones (``vision``, ``text``, ``trunk``) merge key by key.

    ``depth=N`` sets the depth of every tower at once (the zoo-wide smoke tests build depth-1 models).
    """
    overrides = dict(overrides)
    if "depth" in overrides:
        d = overrides.pop("depth")
        if "trunk" in info.arch_kwargs:
            overrides = {"decoder_layers": d, **overrides}
            overrides["trunk"] = {"depth": d, **overrides.get("trunk", {})}
        else:
            overrides["vision"] = {"layers": d, **overrides.get("vision", {})}
        overrides["text"] = {"layers": d, **overrides.get("text", {})}
    out = dict(info.arch_kwargs)
    for k, v in overrides.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_clip(info: ModelInfo, overrides: dict[str, Any]) -> CLIPModel:
    kw = _merge(info, overrides)
    act = kw.get("act", "gelu")
    return CLIPModel(VisionTower(**kw["vision"], act=act), TextTransformer(**kw["text"], act=act))


@register_model(info=PLIP, filter_fn=hf_clip_filter)
def plip(**kwargs: Any) -> CLIPModel:
    """PLIP (CLIP ViT-B/32); ``encode_image`` / ``encode_text`` give 512-d embeddings."""
    return build_clip(PLIP, kwargs)


@register_model(info=QUILTNET_B32, filter_fn=openclip_filter)
def quiltnet_b32(**kwargs: Any) -> CLIPModel:
    """QuiltNet-B-32 (open_clip ViT-B/32); ``encode_image`` / ``encode_text`` give 512-d embeddings."""
    return build_clip(QUILTNET_B32, kwargs)


@register_model(info=CONCH, filter_fn=conch_filter)
def conch(**kwargs: Any) -> CoCa:
    """CONCH (CoCa ViT-B/16 at 448 px); ``encode_image`` / ``encode_text`` give 512-d embeddings."""
    return CoCa(**_merge(CONCH, kwargs))
