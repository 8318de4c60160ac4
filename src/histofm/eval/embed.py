"""Frozen-encoder embeddings of image tiles for the evaluation protocols.

For Vision Transformers the embedding is the class token concatenated with the
mean of the patch tokens after the final norm (registers excluded), the recipe
of Virchow and of the project's baselines; any other module gives ``model(x)``
flattened. Images are scaled to ``[0, 1]``, optionally resized, and normalised
with the encoder's mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError


def token_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``concat(class token, mean patch token)`` for ViTs, else ``model(x)`` flattened; ``(B, E)``."""
    prefix = getattr(model, "num_prefix_tokens", None)
    if hasattr(model, "forward_features") and prefix:
        tokens = model.forward_features(x)  # (B, P + N, D)
        if tokens.dim() == 3:
            return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)
    return model(x).flatten(1)


def to_model_input(
    images: torch.Tensor,
    mean: Iterable[float],
    std: Iterable[float],
    size: int | None = None,
    multiple_of: int | None = None,
) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` or float ``(B, 3, H, W)`` in [0, 1] to a normalised float batch ``(B, 3, S, S)``.

    ``size`` resizes (bicubic, antialiased); otherwise the side is rounded up to a
    multiple of ``multiple_of`` (a ViT's patch size) when needed.
    """
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise HistofmError(f"uint8 images must be (B, H, W, 3), got {tuple(images.shape)}.")
        x = images.permute(0, 3, 1, 2).float() / 255.0
    else:
        x = images.float()
    if x.dim() != 4 or x.shape[1] != 3:
        raise HistofmError(f"Images must be RGB batches (B, 3, H, W), got {tuple(x.shape)}.")
    target = size
    if target is None and multiple_of and (x.shape[-1] % multiple_of or x.shape[-2] % multiple_of):
        target = -(-max(x.shape[-2:]) // multiple_of) * multiple_of
    if target is not None and tuple(x.shape[-2:]) != (target, target):
        x = F.interpolate(x, size=(target, target), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    m = torch.tensor(list(mean), dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    mean: Iterable[float],
    std: Iterable[float],
    size: int | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "embedding",
) -> np.ndarray:
    """Embeddings ``(N, E)`` float32 of an image stack (see :func:`to_model_input` for the layouts)."""
    from rich.progress import Progress

    images = torch.as_tensor(images)
    model = model.eval().to(device)
    patch = getattr(model, "patch_size", None)
    out = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=len(images))
        for s in range(0, len(images), batch_size):
            x = to_model_input(images[s : s + batch_size], mean, std, size, patch if isinstance(patch, int) else None)
            dtype = next(model.parameters()).dtype
            out.append(token_embedding(model, x.to(device, dtype)).float().cpu())
            bar.update(task, advance=len(x))
    return torch.cat(out).numpy()
