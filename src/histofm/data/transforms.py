"""Evaluation transforms: each zoo model's own resize, crop and normalisation.

Training augmentations live in ``histofm.data.augment`` / ``histofm.data.stain``;
this module only reproduces the deterministic preprocessing a model expects at
inference, read from its :class:`~histofm.registry.ModelInfo`::

    x -> Resize(info.resize or input size) -> CenterCrop(input size)
      -> float in [0, 1] -> (x - mean) / std

With ``info.resize`` set (Prov-GigaPath: shorter side to 256, bicubic) the image is
resized keeping its aspect ratio and centre-cropped; otherwise it is resized
straight to the input size. Resizing happens before the conversion to a tensor,
so PIL images are resized by PIL exactly as timm's and torchvision's reference
pipelines do.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from histofm.errors import HistofmError
from histofm.registry import ModelInfo

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


def _array_to_image(array: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` array to a ``(C, H, W)`` image tensor (copied: arrays may be read-only)."""
    return v2.functional.to_image(np.array(array, copy=True))


def eval_transform_for(info: ModelInfo) -> v2.Compose:
    """The inference preprocessing of the model described by ``info``.

    Accepts a PIL image, a ``uint8`` tensor/ndarray ``(C, H, W)`` / ``(H, W, C)``
    and returns a normalised ``float32`` tensor of shape ``info.input_size``.
    """
    if info.interpolation not in _INTERPOLATION:
        raise HistofmError(
            f"Model {info.name!r} names an unknown interpolation {info.interpolation!r}; "
            f"use one of {', '.join(_INTERPOLATION)}."
        )
    _, height, width = info.input_size
    mode = _INTERPOLATION[info.interpolation]
    resize = v2.Resize(info.resize, interpolation=mode, antialias=True) if info.resize else (
        v2.Resize((height, width), interpolation=mode, antialias=True)
    )
    return v2.Compose([
        v2.Lambda(_array_to_image, np.ndarray),  # (H, W, C) arrays -> tensors; PIL stays PIL
        resize,
        v2.CenterCrop((height, width)),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(info.mean), std=list(info.std)),
    ])
