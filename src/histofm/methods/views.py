"""How a pretraining method gets its backbone and turns images into its training input.

Shared by every method that builds on ``histofm.create_model`` (SimCLR, MoCo,
CLIP, MAE, SimMIM/BEiT), so no method file imports another: a method reads its
own file plus this one.

* :func:`make_backbone` builds the encoder being pretrained.
* :func:`view_config` and :func:`view_pipeline` turn view recipes
  (:class:`~histofm.data.augment.ViewConfig`) into the per-sample transform and,
  with ``augment="batch"``, the on-device batch augmenters; :func:`make_views`
  reads the view batches back out of a collated batch.
* :func:`pretrain_transform` is the single-view recipe of the masked-image methods
  (random resized crop and flips, no colour jitter) and :func:`images_of` reads
  their image batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from histofm.data.augment import BatchAugment, MultiView, ViewConfig, base_view, view_transform
from histofm.errors import HistofmError
from histofm.settings import config_replace


def make_backbone(arch: str, img_size: int, kwargs: dict[str, Any]) -> nn.Module:
    """``histofm.create_model(arch, img_size=img_size, **kwargs)``."""
    from histofm.registry import create_model

    return create_model(arch, **{"img_size": img_size, **kwargs})


# ------------------------------------------------------------------- views of contrastive methods
def view_config(arch: str, img_size: int, changes: dict[str, Any]) -> ViewConfig:
    """A :class:`ViewConfig` at ``img_size`` with the model's normalisation, then ``changes``."""
    from histofm.registry import model_info

    info = model_info(arch)
    return config_replace(ViewConfig(size=img_size, mean=info.mean, std=info.std), changes)


def view_pipeline(
    views: list[ViewConfig], augment: str, base_size: int
) -> tuple[Callable[[Any], Any], list[BatchAugment | None]]:
    """Per-sample transform and batch augmenters for a list of view recipes.

    ``augment="sample"``: a :class:`MultiView` of torchvision pipelines and no augmenters;
    ``"batch"``: a resize-and-normalise transform (to ``base_size``) and one
    :class:`BatchAugment` per view.
    """
    if augment == "sample":
        return MultiView([view_transform(v) for v in views]), [None] * len(views)
    if augment == "batch":
        v = views[0]
        return base_view(base_size or v.size, v.mean, v.std), [BatchAugment(v) for v in views]
    raise HistofmError(f"augment must be 'sample' or 'batch', got {augment!r}; set --set augment=sample or augment=batch.")


def make_views(batch: Any, augmenters: list[BatchAugment | None]) -> list[torch.Tensor]:  # noqa: ANN401
    """The view batches of ``batch``.

    With batch augmentation (``augmenters`` not None), ``batch`` is an image batch ``(B, C, H, W)``
    (or ``(images, labels...)``) and view ``i`` is ``augmenters[i](images)``; otherwise ``batch`` is
    the collated list of per-sample views (or ``(views, labels...)``).
    """
    if augmenters and augmenters[0] is not None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise HistofmError("Batch augmentation expects an image batch (B, C, H, W); use the transform the method's build() returns.")
        return [aug(x) for aug in augmenters]  # type: ignore[misc]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise HistofmError("The method expects a batch of at least two views; use the view transform the method's build() returns.")
    return list(batch)


# ------------------------------------------------------------------- one view: masked-image methods
def pretrain_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_scale: tuple[float, float] = (0.2, 1.0),
    vertical_flip: bool = True, hed: tuple[float, float, float] = (0.0, 0.05, 0.01),
) -> Callable[[Any], torch.Tensor]:
    """MAE's augmentation: random resized crop, flips, to tensor, normalise (no colour jitter).

    ``hed`` = ``(p, sigma, bias)`` adds HED stain jitter (:class:`~histofm.data.stain.HEDJitter`) with
    probability ``p`` (off by default, as in the papers); the reconstruction target is the jittered image.
    """
    from torchvision import transforms as T

    from histofm.data.stain import HEDJitter

    ops: list[Any] = [
        T.RandomResizedCrop(img_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if vertical_flip:
        ops.append(T.RandomVerticalFlip())
    ops.append(T.ToTensor())
    if hed[0] > 0:
        ops.append(HEDJitter(hed[1], hed[2], p=hed[0]))
    ops.append(T.Normalize(mean, std))
    return T.Compose(ops)


def images_of(batch: Any) -> torch.Tensor:  # noqa: ANN401
    """Accept a tensor batch or ``(images, labels, ...)`` from an image-folder style loader."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise HistofmError("The masked-image methods expect a batch of images (B, C, H, W); check the view transform.")
    return x
