"""What happens to tiles between the slide and the encoder: per-tile transforms in the readers,
batched normalisation on the device.

Split from :mod:`histofm.wsi.features`, which imports these (tiles stay ``uint8`` until the
device whenever the model's preprocessing is a plain normalisation at the tile size).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from histofm.errors import HistofmError


class _Preprocess:
    """Per-tile transform (in the workers) and per-batch normalisation (on the device).

    When the model's preprocessing is only "to float, subtract mean, divide by std" at the
    tile size (no resize, no crop), tiles travel as uint8 and are normalised on the device
    in one batched operation: identical numbers, a quarter of the inter-process traffic and
    no per-tile Python work. Otherwise the model's own ``eval_transform`` runs per tile.
    """

    def __init__(
        self, model_name: str, tile_size: int, transform: Callable[..., Any] | None, *, channels_last: bool = False,
        stain: Any = None, stain_label: str = "none",  # noqa: ANN401
    ) -> None:
        from histofm.registry import IMAGENET_MEAN, IMAGENET_STD, model_info

        self.channels_last = channels_last
        self.stain, self.stain_label = stain, stain_label  # a fitted StainNormalize, or None
        self._buffer: torch.Tensor | None = None  # reused float input on CPU (see batch)
        self.tile_transform = transform
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        # What the provenance records: the side the model sees and how tiles get there.
        self.resize, self.interpolation = int(tile_size), "none"
        if transform is not None:
            self.resize, self.interpolation = 0, "custom transform"
            return
        try:
            info = model_info(model_name)
        except HistofmError:  # a custom module: ImageNet statistics, tiles as they are
            return
        self.mean, self.std = tuple(info.mean), tuple(info.std)
        if info.resize is None and tuple(info.input_size[1:]) == (tile_size, tile_size):
            return  # fast path: batched normalisation
        self.tile_transform = _eval_transform(model_name, info)
        self.resize, self.interpolation = int(info.resize or info.input_size[-1]), str(info.interpolation)

    def worker_transform(self) -> Callable[..., Any] | None:
        """The per-tile transform the readers run: stain normalisation first when it cannot wait for the batch."""
        if self.tile_transform is None or self.stain is None:
            return self.tile_transform
        return _StainThen(self.stain, self.tile_transform)

    def record(self) -> dict[str, Any]:
        """``preprocess_*`` provenance attributes."""
        return {
            "preprocess_resize": self.resize, "preprocess_interpolation": self.interpolation,
            "preprocess_mean": tuple(float(v) for v in self.mean), "preprocess_std": tuple(float(v) for v in self.std),
            "preprocess_stain_norm": self.stain_label,
        }

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack a batch in the worker; uint8 tiles stay channels-last, so stacking is a plain copy."""
        # default_collate stacks straight into shared memory inside a worker (no extra copy on send).
        xy = default_collate([item[1] for item in items])  # (B, 2)
        if self.tile_transform is not None:
            return default_collate([item[0] for item in items]), xy  # (B, 3, S, S) from the transform
        # The dataset's (3, S, S) tiles are views of (S, S, 3) arrays: undo the view, not the memory.
        return default_collate([item[0].permute(1, 2, 0) for item in items]), xy  # (B, S, S, 3) uint8

    def batch(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The model input ``(B, 3, S, S)`` on ``device`` from a collated batch."""
        x = x.to(device, non_blocking=True)
        if self.tile_transform is None and self.stain is not None:  # (B, S, S, 3) uint8, batched on the device
            x = self.stain.norm.transform(x, per_image=self.stain.per_image)
        if self.tile_transform is not None:
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        scale = 1.0 / (torch.tensor(self.std, device=device) * 255.0)  # (3,) broadcast over the last dim
        shift = -torch.tensor(self.mean, device=device) * 255.0 * scale
        # Normalise on the dense (B, S, S, 3) memory, then hand the model a channels-last view:
        # no transpose copy, and 2-3x faster than broadcasting over (1, 3, 1, 1) on CPU.
        if device.type == "cpu":
            # One reused float buffer (a fresh 38 MB array per batch costs its page faults every
            # time) and one fused x * scale + shift pass: 3x faster than x.float().sub_().mul_().
            if self._buffer is None or self._buffer.shape[1:] != x.shape[1:] or len(self._buffer) < len(x):
                self._buffer = torch.empty(x.shape, dtype=torch.float32)
            b, h, w, c = x.shape
            buf = self._buffer[: len(x)].copy_(x)
            # Rows of w * 3 values with the (3,) statistics repeated along them: a wide inner
            # dimension vectorises (2x faster than broadcasting over a last dimension of 3), same numbers.
            flat = buf.view(b * h, w * c)
            torch.addcmul(shift.repeat(w), flat, scale.repeat(w), out=flat)
            x = buf  # (B, S, S, 3)
        else:
            x = torch.addcmul(shift, x.float(), scale)  # (B, S, S, 3)
        return x.permute(0, 3, 1, 2)  # (B, 3, S, S)


def _file_label(target: str) -> str:
    """``name@sha256[:12]`` of a stain target file (a bundled sample name stays as it is)."""
    import hashlib

    from histofm.data import SAMPLES

    if str(target) in SAMPLES:
        return str(target)
    p = Path(target)
    return f"{p.name}@{hashlib.sha256(p.read_bytes()).hexdigest()[:12]}"


class _StainThen:
    """Stain-normalise an RGB PIL tile, then run the model's transform (picklable for reader workers)."""

    def __init__(self, stain: Any, transform: Callable[..., Any]) -> None:  # noqa: ANN401
        self.stain, self.transform = stain, transform

    def __call__(self, img: Any) -> Any:  # noqa: ANN401
        from PIL import Image

        rgb = np.asarray(img.convert("RGB"))
        return self.transform(Image.fromarray(self.stain.norm.transform(rgb)))


def _eval_transform(model_name: str, info: Any) -> Callable[..., Any]:
    """The model's own eval transform (:func:`histofm.data.transforms.eval_transform_for`, the one builder)."""
    from histofm.data.transforms import eval_transform_for

    return eval_transform_for(info)
