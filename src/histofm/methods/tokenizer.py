"""A visual tokenizer trained inside the package: k-means over coarse patch pixels (for BEiT-style MIM).

BEiT (Bao et al. 2021, arXiv 2106.08254) predicts, for each masked patch, the
index of a "visual token" given by the discrete VAE of DALL-E, trained
separately on 250M images. Nothing may be downloaded here, and a dVAE is a
project of its own, so histofm uses the simplest tokenizer that gives discrete
targets with visual meaning: a k-means codebook (Lloyd's algorithm, k-means++
seeding) over a coarse description of each patch.

A patch of ``p x p`` pixels (normalised image) is average-pooled to
``pool x pool`` cells per channel, giving a ``pool * pool * C`` vector (48
numbers for ``pool = 4``); its token is the index of the nearest of ``K``
centroids::

    f(patch) = avgpool_{pool x pool}(patch)                    # (pool*pool*C,)
    token    = argmin_k || f(patch) - c_k ||^2

Pooling drops pixel noise (which no model can predict from context) and keeps
what a pathologist would name: colour (haematoxylin vs eosin vs glass) and
coarse layout (a nucleus edge across the patch, a fibre direction). Colour is
not normalised away on purpose: in H&E it is the signal. The same ``K``
centroids, drawn as ``pool x pool`` pictures, decode tokens back to coarse
images, which is how BEiT-style predictions are visualised.

Why not a VQ autoencoder trained on the fly: its codebook moves while the ViT
learns to predict it, it needs its own training schedule and has collapse modes
of its own (dead codes), whereas k-means on a few thousand patches takes well
under a second, is deterministic given a seed, and is re-fitted the same way on
any data. The codebook is a buffer, so it is saved in checkpoints and resumed
exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError


def kmeans(
    x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns centroids ``(k, F)`` of points ``x`` ``(n, F)``.

    k-means++ (Arthur & Vassilvitskii 2007) picks each new seed with probability
    proportional to its squared distance to the nearest seed so far. An empty
    cluster is re-seeded with the point farthest from its centroid. ``generator``
    (a CPU generator) makes the seeding reproducible.
    """
    n = x.shape[0]
    if n < k:
        raise HistofmError(f"k-means needs at least {k} points for {k} clusters, got {n}; use more images or a smaller vocabulary.")
    x = x.float()
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)  # (n,) squared distance to the nearest seed
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        i = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        centroids.append(x[i])
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(1))
    c = torch.stack(centroids)  # (k, F)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)  # (n,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if empty.any():
            err = (x - new[assign]).pow(2).sum(1)  # (n,)
            far = err.topk(int(empty.sum())).indices
            new[empty] = x[far]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c


class KMeansTokenizer(nn.Module):
    """Patch -> token index by the nearest k-means centroid of its pooled pixels (see the module docstring).

    Args:
        vocab_size: number of tokens ``K``.
        pool: each patch is average-pooled to ``pool x pool`` cells per channel.
        in_chans: image channels.
        iters: Lloyd iterations when fitting.
    """

    codebook: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, vocab_size: int = 512, pool: int = 4, in_chans: int = 3, iters: int = 20) -> None:
        super().__init__()
        if vocab_size < 2:
            raise HistofmError(f"vocab_size must be at least 2, got {vocab_size}.")
        self.vocab_size, self.pool, self.in_chans, self.iters = vocab_size, pool, in_chans, iters
        self.register_buffer("codebook", torch.zeros(vocab_size, pool * pool * in_chans))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def features(self, imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Pooled patch descriptors ``(B, N, pool*pool*C)`` in row-major patch order."""
        B, C, H, W = imgs.shape
        gh, gw, q = H // patch_size, W // patch_size, self.pool
        pooled = F.adaptive_avg_pool2d(imgs.float(), (gh * q, gw * q))  # (B, C, gh*q, gw*q)
        x = pooled.reshape(B, C, gh, q, gw, q).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, q, q, C)
        return x.reshape(B, gh * gw, q * q * C)

    @torch.no_grad()
    def fit(self, imgs: torch.Tensor, patch_size: int, seed: int = 0, max_points: int = 100_000) -> KMeansTokenizer:
        """Fit the codebook on the patches of ``imgs`` ``(B, C, H, W)`` (normalised like the training input).

        Under ``torchrun`` rank 0's codebook is broadcast so every rank has the same tokens.
        """
        with torch.autocast(imgs.device.type, enabled=False):
            feats = self.features(imgs, patch_size).reshape(-1, self.codebook.shape[1])  # (B*N, F)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            if feats.shape[0] > max_points:
                feats = feats[torch.randperm(feats.shape[0], generator=gen)[:max_points].to(feats.device)]
            centroids = kmeans(feats.cpu(), self.vocab_size, self.iters, gen)
        self.codebook.copy_(centroids.to(self.codebook))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook, src=0)
        self.fitted.fill_(True)
        return self

    @torch.no_grad()
    def encode(self, imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Token indices ``(B, N)`` (long) of the patches of ``imgs``."""
        if not bool(self.fitted):
            raise HistofmError("The tokenizer has no codebook yet; call fit(images, patch_size) first.")
        with torch.autocast(imgs.device.type, enabled=False):
            feats = self.features(imgs, patch_size)  # (B, N, F)
            B, N, Fd = feats.shape
            return torch.cdist(feats.reshape(B * N, Fd), self.codebook.float()).argmin(1).reshape(B, N)

    def decode(self, tokens: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
        """Coarse images ``(B, C, gh*p, gw*p)`` drawn from the centroids of ``tokens`` ``(B, N)``."""
        B = tokens.shape[0]
        gh, gw, q, C = grid[0], grid[1], self.pool, self.in_chans
        cells = self.codebook[tokens].reshape(B, gh, gw, q, q, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, q, gw, q)
        coarse = cells.reshape(B, C, gh * q, gw * q)
        return F.interpolate(coarse, size=(gh * patch_size, gw * patch_size), mode="nearest")
