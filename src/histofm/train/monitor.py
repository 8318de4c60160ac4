"""Collapse watch: is the encoder still spreading samples out?

Two numbers on a fixed monitoring batch of embeddings ``Z`` ``(N, D)``:

* ``embed_std``: the standard deviation over the batch of the L2-normalised
  embeddings, averaged over dimensions. Uniformly spread unit vectors give about
  ``1 / sqrt(D)`` (logged as ``embed_std_ref``); a collapsed encoder (every sample
  mapped to the same point) gives 0 (SimSiam, Chen & He 2020, arXiv 2011.10566).
* ``rankme``: the effective rank of ``Z`` (Garrido et al. 2023, "RankMe",
  arXiv 2210.02885): with singular values ``sigma_k`` and ``p_k = sigma_k / ||sigma||_1 + eps``,
  ``RankMe(Z) = exp(-sum_k p_k log p_k)``; between 1 (collapse to a line) and ``min(N, D)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from histofm import accel
from histofm.train.config import TrainConfig
from histofm.train.data import SeededViews, first_image, seeded
from histofm.utils.objective import Objective


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of L2-normalised embeddings ``(N, D)``."""
    z = F.normalize(z.float(), dim=-1)
    return float(z.std(dim=0).mean())


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of embeddings ``(N, D)`` (Garrido et al. 2023)."""
    s = torch.linalg.svdvals(z.double())  # (min(N, D),)
    p = s / s.sum().clamp_min(1e-12) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def collapse_stats(z: torch.Tensor) -> dict[str, float]:
    """``embed_std``, ``embed_std_ref`` (= 1/sqrt(D)) and ``rankme`` of embeddings ``(N, D)``."""
    z = z.flatten(1)
    if not bool(torch.isfinite(z).all()):  # diverged weights: nothing to measure (the non-finite guard reports it)
        return {"embed_std": float("nan"), "embed_std_ref": 1.0 / math.sqrt(z.shape[1]), "rankme": float("nan")}
    return {"embed_std": embedding_std(z), "embed_std_ref": 1.0 / math.sqrt(z.shape[1]), "rankme": rankme(z)}


def monitor_batch(views: SeededViews, n: int, cfg: TrainConfig) -> torch.Tensor | None:
    """The collapse watch's images: the first view of ``cfg.monitor_samples`` fixed samples."""
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    idx = torch.randperm(n, generator=g)[: min(cfg.monitor_samples, n)]
    imgs = []
    with seeded(cfg.seed):  # never touches the training random state
        for i in idx.tolist():
            img = first_image(views[(i, -1)])
            if img is None:
                return None
            imgs.append(img)
    if len({tuple(t.shape) for t in imgs}) != 1:
        return None
    return torch.stack(imgs)  # (N, C, H, W)


def stream_monitor_batch(data: Any, transform: Callable[[Any], Any] | None, cfg: TrainConfig) -> torch.Tensor | None:  # noqa: ANN401
    """The collapse watch's images from a step stream's first samples (its ``preview``)."""
    preview = getattr(data, "preview", None)
    if preview is None or transform is None:
        return None
    imgs = []
    with seeded(cfg.seed):
        for item in preview(cfg.monitor_samples):
            img = first_image(transform(item))
            if img is None:
                return None
            imgs.append(img)
    if not imgs or len({tuple(t.shape) for t in imgs}) != 1:
        return None
    return torch.stack(imgs)  # (N, C, H, W)


def first_image_batch(batch: Any, limit: int) -> torch.Tensor | None:  # noqa: ANN401
    """The first image batch ``(B, C, H, W)`` in a loader's batch, at most ``limit`` images."""
    if isinstance(batch, torch.Tensor):
        return batch[:limit] if batch.ndim == 4 else None
    if isinstance(batch, (list, tuple)):
        for b in batch:
            t = first_image_batch(b, limit)
            if t is not None:
                return t
    return None


@torch.no_grad()
def monitor_step(method: Objective, images: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> dict[str, float]:
    """:func:`collapse_stats` of ``method.embed`` on the monitoring images (eval mode, RNG untouched)."""
    was_training = method.training
    method.eval()
    try:
        with accel.unsharded(method), torch.random.fork_rng(devices=[]), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            z = torch.cat([method.embed(images[i : i + 256].to(device)) for i in range(0, len(images), 256)])
    finally:
        method.train(was_training)
    return collapse_stats(z.float())
