"""The model factory: ``create_model``, ``list_models``, ``model_info`` (floor 6 of the house).

A model is a function registered with :func:`register_model` that builds an
``nn.Module`` from keyword arguments. Zoo entries also carry a :class:`ModelInfo`
record (preprocessing, embedding recipe, hub id, licence, paper) and optionally a
``checkpoint_filter_fn`` that converts a foreign checkpoint layout to ours.

The records and the tables live in the registry leaf :mod:`histofm._registry`, which the
zoo registers into; this module imports the zoo to fill them, and builds models from
them. ``ModelInfo``, ``register_model`` and friends are re-exported here, so
``histofm.registry.ModelInfo`` keeps working.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histofm._registry import (
    _REGISTRY,
    _SLIDE_REGISTRY,
    ModelInfo,
    SlideEncoderInfo,
    _Entry,
    register_model,
    register_slide_encoder,
    replace_info,
)
from histofm.constants import IMAGENET_MEAN, IMAGENET_STD
from histofm.errors import HistofmError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelInfo",
    "SlideEncoderInfo",
    "create_model",
    "create_slide_encoder",
    "list_models",
    "list_slide_encoders",
    "model_info",
    "register_model",
    "register_slide_encoder",
    "replace_info",
    "slide_encoder_info",
]


def _ensure_loaded() -> None:
    # Importing the zoo runs its @register_model decorators (the generic ViTs and every vendor).
    import histofm.zoo  # noqa: F401


def _names(table: dict[str, Any], pattern: str | None) -> list[str]:
    """Sorted names of a registry table, optionally filtered by a shell pattern."""
    _ensure_loaded()
    names = sorted(table)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell pattern (``"vit_*"``)."""
    return _names(_REGISTRY, pattern)


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


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> Any:  # noqa: ANN401
    """Load a ``.safetensors`` / ``.bin`` / ``.pth`` file (or snapshot directory) into ``model``.

    Official DINOv2 and timm layouts are converted (with the zoo entry's own key filter when
    ``model`` came from :func:`create_model`); a mismatch raises one :class:`HistofmError`
    listing the missing and unexpected keys.
    """
    from histofm.models.convert import load_checkpoint as _load

    name = getattr(model, "histofm_name", None)
    filter_fn = _entry(name).filter_fn if name is not None else None
    return _load(model, Path(path), filter_fn=filter_fn, strict=strict)


def list_slide_encoders(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered slide encoders, optionally filtered by a shell pattern."""
    return _names(_SLIDE_REGISTRY, pattern)


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
