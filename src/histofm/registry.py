"""The model registry: ``create_model``, ``list_models``, ``model_info``.

A model is a function registered with :func:`register_model` that builds an
``nn.Module`` from keyword arguments. Zoo entries also carry a :class:`ModelInfo`
record (preprocessing, embedding recipe, hub id, licence, paper) and optionally a
``checkpoint_filter_fn`` that converts a foreign checkpoint layout to ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histofm.errors import HistofmError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            raise ValueError(f"model {key!r} is registered twice")
        _REGISTRY[key] = _Entry(f, info, filter_fn, config_fn)
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_loaded() -> None:
    # Importing these modules runs their @register_model decorators.
    import histofm.models.vit_archs  # noqa: F401

    try:
        import histofm.zoo  # noqa: F401
    except ModuleNotFoundError as e:  # the zoo package is optional while it is being built
        if e.name != "histofm.zoo":
            raise


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell pattern (``"vit_*"``)."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def _entry(name: str) -> _Entry:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else " Run `histofm models` to list them."
        raise HistofmError(f"Unknown model {name!r}.{hint}")
    return _REGISTRY[name]


def model_info(name: str) -> ModelInfo:
    """The info record of a registered model (a minimal one for generic architectures)."""
    entry = _entry(name)
    if entry.info is not None:
        return entry.info
    return ModelInfo(name=name, arch=name, public_weights=False, notes="generic architecture, no weights")


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: a name from :func:`list_models`.
        pretrained: download the official weights through ``huggingface_hub``.
        checkpoint_path: a local ``.safetensors`` / ``.bin`` / ``.pth`` file or a
            Hugging Face snapshot directory; official layouts are converted.
        dtype: parameter dtype (for example ``torch.bfloat16``).
        device: where the parameters live.
        **overrides: constructor arguments that replace the registered defaults
            (``depth=2``, ``drop_path_rate=0.1``, ``num_classes=5`` ...).

    With weights, the model is built on the meta device and the checkpoint's
    tensors are assigned in place, so a large model is never held twice in memory.
    """
    entry = _entry(name)
    if pretrained and checkpoint_path is None:
        from histofm.hub import download_weights

        checkpoint_path = download_weights(model_info(name))
    if checkpoint_path is not None and entry.config_fn is not None:
        overrides = {**entry.config_fn(Path(checkpoint_path)), **overrides}
    try:
        if checkpoint_path is None:
            model = entry.fn(**overrides)
        else:
            with torch.device("meta"):
                model = entry.fn(**overrides)
    except TypeError as e:
        raise HistofmError(f"Model {name!r} does not accept these arguments: {e}.") from None
    if checkpoint_path is not None:
        from histofm.models.convert import load_checkpoint

        load_checkpoint(model, Path(checkpoint_path), filter_fn=entry.filter_fn, assign=True, dtype=dtype)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device=device)
    model.eval() if checkpoint_path is not None else None
    model.histofm_name = name  # type: ignore[assignment]
    model.histofm_overrides = dict(overrides)  # type: ignore[assignment]  # recorded in exported checkpoints
    return model


def replace_info(info: ModelInfo, **changes: Any) -> ModelInfo:
    """``dataclasses.replace`` for info records (a misspelt field fails loudly)."""
    return dataclasses.replace(info, **changes)


# ---------------------------------------------------------------------------------------------
# Slide encoders: models that turn a slide's tile features and coordinates into one embedding.
# They live in a registry of their own because their forward takes ``(features, coords)``, not
# images: ``create_model`` and the tile-encoder tests never see them.
# ---------------------------------------------------------------------------------------------


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
            raise ValueError(f"slide encoder {key!r} is registered twice")
        _SLIDE_REGISTRY[key] = _Entry(f, info, filter_fn)
        return f

    return wrap(fn) if fn is not None else wrap


def list_slide_encoders(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered slide encoders, optionally filtered by a shell pattern."""
    _ensure_loaded()
    names = sorted(_SLIDE_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def _slide_entry(name: str) -> _Entry:
    _ensure_loaded()
    if name not in _SLIDE_REGISTRY:
        close = difflib.get_close_matches(name, list(_SLIDE_REGISTRY), n=3, cutoff=0.5)
        hint = f"Did you mean {', '.join(close)}?" if close else f"Known: {', '.join(sorted(_SLIDE_REGISTRY))}."
        raise HistofmError(f"Unknown slide encoder {name!r}; pass one of the registered names to --slide-encoder. {hint}")
    return _SLIDE_REGISTRY[name]


def slide_encoder_info(name: str) -> SlideEncoderInfo:
    """The info record of a registered slide encoder."""
    info = _slide_entry(name).info
    assert isinstance(info, SlideEncoderInfo)
    return info


def create_slide_encoder(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered slide encoder, optionally loading its official checkpoint.

    Arguments as :func:`create_model`; the model's ``forward(features (B, N, C), coords (B, N, 2),
    tile_size=None)`` returns ``(B, D)`` slide embeddings.
    """
    entry = _slide_entry(name)
    if pretrained and checkpoint_path is None:
        from histofm.hub import download_weights

        checkpoint_path = download_weights(slide_encoder_info(name))
    try:
        model = entry.fn(**overrides)
    except TypeError as e:
        raise HistofmError(f"Slide encoder {name!r} does not accept these arguments: {e}.") from None
    if checkpoint_path is not None:
        from histofm.models.convert import load_checkpoint

        load_checkpoint(model, Path(checkpoint_path), filter_fn=entry.filter_fn, dtype=dtype)
        model.eval()
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device=device)
    model.histofm_name = name  # type: ignore[assignment]
    model.histofm_overrides = dict(overrides)  # type: ignore[assignment]
    return model
