"""The registry leaf: :class:`ModelInfo`, :func:`register_model` and the tables they fill.

This module is floor 4 of the house (see ``docs/architecture.md``): it imports nothing
above ``models/``, so the zoo and the generic architectures can register themselves
into it without forming an import cycle with the factory (:mod:`histofm.registry`,
``create_model`` / ``list_models``), which imports the zoo. Code outside the zoo
should keep using the public names re-exported by :mod:`histofm.registry`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histofm.constants import IMAGENET_MEAN, IMAGENET_STD
from histofm.errors import HistofmError


@dataclass(frozen=True)
class ModelInfo:
    """What a user needs to know to use a model's weights correctly."""

    name: str
    arch: str  # human-readable architecture, e.g. "ViT-H/14 + 4 registers"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 0  # size of model(x)
    embedding: str = "class token after the final norm"
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    resize: int | None = None  # resize shorter side before centre crop (None: resize to input)
    mpp: float = 0.5
    hub_id: str | None = None
    hub_filename: str | None = None
    gated: bool = False
    public_weights: bool = True
    license: str = "unknown"
    paper: str = ""
    method: str = ""
    data: str = ""
    num_params: int | None = None
    pretrain_config: str | None = None  # histofm config that reproduces the recipe at small scale
    notes: str = ""
    # What the model is for: "tile" (a tile encoder: model(x) is the embedding that `extract` writes),
    # "vision-language" (encode_image / encode_text into a joint space of size embed_dim; not for `extract`).
    kind: str = "tile"
    # Vision-language models: how histofm.tokenize() prepares their text (tokenizer, context_length, pad).
    text: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Entry:
    fn: Callable[..., nn.Module]
    info: ModelInfo | None = None
    filter_fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None
    # Reads constructor arguments from a checkpoint's folder (e.g. LayerNorm eps from config.json).
    config_fn: Callable[[Path], dict[str, Any]] | None = None


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    info: ModelInfo | None = None,
    filter_fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
    name: str | None = None,
    config_fn: Callable[[Path], dict[str, Any]] | None = None,
) -> Any:
    """Register a model builder; usable as ``@register_model`` or ``@register_model(info=...)``.

    ``config_fn(checkpoint_path)`` may return constructor arguments read beside the
    checkpoint (a Hugging Face ``config.json``); explicit overrides still win.
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY:
            raise HistofmError(f"Model {key!r} is registered twice; register the new model under another name.")
        _REGISTRY[key] = _Entry(f, info, filter_fn, config_fn)
        return f

    return wrap(fn) if fn is not None else wrap


def replace_info(info: ModelInfo, **changes: Any) -> ModelInfo:
    """``dataclasses.replace`` for info records (a misspelt field fails loudly)."""
    return dataclasses.replace(info, **changes)


# Slide encoders: models that turn a slide's tile features and coordinates into one embedding.
# They live in a table of their own because their forward takes ``(features, coords)``, not
# images: ``create_model`` and the tile-encoder tests never see them.


@dataclass(frozen=True)
class SlideEncoderInfo(ModelInfo):
    """A :class:`ModelInfo` plus what a slide encoder needs from the tile features it reads."""

    tile_encoder: str = ""  # zoo name of the tile encoder whose features it was trained on
    in_dim: int = 0  # width of those tile features
    tile_px: int = 256  # tile side in pixels at ``mpp`` that the tile encoder saw
    verified: str = ""  # what the tests compare against, or "unverified" and why


_SLIDE_REGISTRY: dict[str, _Entry] = {}


def register_slide_encoder(
    fn: Callable[..., nn.Module] | None = None,
    *,
    info: SlideEncoderInfo | None = None,
    filter_fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
    name: str | None = None,
) -> Any:
    """Register a slide-encoder builder (``@register_slide_encoder(info=...)``)."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _SLIDE_REGISTRY:
            raise HistofmError(f"Slide encoder {key!r} is registered twice; register the new encoder under another name.")
        _SLIDE_REGISTRY[key] = _Entry(f, info, filter_fn)
        return f

    return wrap(fn) if fn is not None else wrap
