"""Hugging Face ``transformers`` checkpoints (ViTModel, Dinov2Model, DINOv2 with registers) -> timm names.

Key names as ``save_pretrained`` writes them (and as stored on the hub)::

    embeddings.cls_token                         -> cls_token
    embeddings.register_tokens                   -> reg_token
    embeddings.mask_token                        -> mask_token
    embeddings.position_embeddings               -> pos_embed
    embeddings.patch_embeddings.projection.*     -> patch_embed.proj.*
    encoder.layer.N.attention.attention.{query,key,value}.*  -> blocks.N.attn.qkv.* (concatenated q;k;v)
    encoder.layer.N.attention.output.dense.*     -> blocks.N.attn.proj.*
    encoder.layer.N.{layernorm_before,norm1}.*   -> blocks.N.norm1.*
    encoder.layer.N.{layernorm_after,norm2}.*    -> blocks.N.norm2.*
    encoder.layer.N.intermediate.dense.*         -> blocks.N.mlp.fc1.*   (ViTModel)
    encoder.layer.N.output.dense.*               -> blocks.N.mlp.fc2.*   (ViTModel)
    encoder.layer.N.mlp.{fc1,fc2}.*              -> blocks.N.mlp.{fc1,fc2}.*        (Dinov2Model)
    encoder.layer.N.mlp.{weights_in,weights_out}.* -> blocks.N.mlp.{fc1,fc2}.*      (SwiGLU FFN)
    encoder.layer.N.layer_scale{1,2}.lambda1     -> blocks.N.ls{1,2}.gamma
    layernorm.*                                  -> norm.*
    pooler.*                                     -> dropped (ViTModel's tanh pooler is not the embedding)

With registers the HF position table covers ``[cls, patches]`` and registers get no
position; our register models add ``pos_embed`` to patches only (``no_embed_class``),
so the class-token row is folded into ``cls_token`` (a constant, hence exact).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.models.convert import convert_dinov2

StateDict = dict[str, torch.Tensor]

_HF_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.")
_EMBED_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER_MAP = {  # module path inside encoder.layer.N -> ours inside blocks.N
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "norm1": "norm1",
    "norm2": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",
    "mlp.weights_out": "mlp.fc2",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_QKV = ("query", "key", "value")


def is_hf_layout(sd: StateDict) -> bool:
    """True when the keys are transformers' ViT / DINOv2 names."""
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd)


def convert_hf_vit(sd: StateDict, model: nn.Module) -> StateDict:
    """Map a transformers ViT / DINOv2 state dict to our (timm) names; other layouts pass to DINOv2/timm."""
    for prefix in _HF_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    if not is_hf_layout(sd):
        return convert_dinov2(sd, model)
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("pooler."):
            continue
        if key in _EMBED_MAP:
            out[_EMBED_MAP[key]] = value
            continue
        m = _LAYER_RE.match(key)
        if m is None:
            out[key] = value  # unknown: reported as unexpected by the loader
            continue
        idx, module, param = int(m.group(1)), m.group(2), m.group(3)
        if module.startswith("attention.attention."):
            qkv.setdefault((idx, param), {})[module.rsplit(".", 1)[1]] = value
        elif param == "lambda1" and module in ("layer_scale1", "layer_scale2"):
            out[f"blocks.{idx}.ls{module[-1]}.gamma"] = value
        elif module in _LAYER_MAP:
            out[f"blocks.{idx}.{_LAYER_MAP[module]}.{param}"] = value
        else:
            out[key] = value
    for (idx, param), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise HistofmError(f"Layer {idx} of the checkpoint lacks one of query/key/value; is the file complete?")
        out[f"blocks.{idx}.attn.qkv.{param}"] = torch.cat([parts[n] for n in _QKV], dim=0)  # (3D, D) q;k;v
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)  # ViTModel stores (1, 1, D)
    if "reg_token" in out and "pos_embed" in out and getattr(model, "no_embed_class", False):
        pos = out["pos_embed"]  # (1, 1 + N, D): [cls, patches]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def _config_path(path: Path) -> Path | None:
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    return cfg if cfg.is_file() else None


def hf_config_overrides(path: Path) -> dict[str, Any]:
    """Constructor arguments read from a snapshot's ``config.json``: the LayerNorm epsilon."""
    cfg_path = _config_path(Path(path))
    if cfg_path is None:
        return {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise HistofmError(f"{cfg_path} is not valid JSON ({type(e).__name__}); fix or remove it.") from None
    eps = cfg.get("layer_norm_eps") if isinstance(cfg, dict) else None
    return {"norm_eps": float(eps)} if eps is not None else {}
