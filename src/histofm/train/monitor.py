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

import torch
import torch.nn.functional as F


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
    return {"embed_std": embedding_std(z), "embed_std_ref": 1.0 / math.sqrt(z.shape[1]), "rankme": rankme(z)}
