"""Block masking of patch grids (BEiT) and DINOv2's rule for which crops to mask.

Block masking, Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers",
arXiv 2106.08254, Algorithm 1: instead of masking patches independently, mask
rectangles of patches until a target count is reached. Each rectangle has an
area drawn uniformly from ``[min_num_patches, remaining]`` and a log-uniform
aspect ratio in ``[min_aspect, 1 / min_aspect]``; a placement is kept only if it
adds new masked patches without overshooting the target. After a few failed
attempts the loop stops, so a mask may hold slightly FEWER patches than asked
(as in BEiT, iBOT and DINOv2) unless ``exact=True`` tops it up at random.

DINOv2 (Oquab et al. 2023, arXiv 2304.07193) masks half of the global crops of
a batch; the masked ones get ratios spread over ``[0.1, 0.5]``: with
``n_masked = int(n * 0.5)`` crops, crop ``i`` draws its ratio uniformly from the
``i``-th of ``n_masked`` equal sub-intervals, and the order of all crops is
shuffled. :class:`BlockMaskCollator` implements that rule for any ratio range and
masking probability, so iBOT (which masks every crop with probability 0.5 and a
ratio in ``[0.1, 0.5]``) and masked-image-modelling methods reuse it.

Randomness comes from a :class:`random.Random` (``random`` is reseeded per
``DataLoader`` worker by PyTorch), so runs are reproducible.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from histofm.errors import HistofmError


def block_mask(
    grid_h: int,
    grid_w: int,
    num_mask: int,
    *,
    min_num_patches: int = 4,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    max_attempts: int = 10,
    exact: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """One BEiT-style block mask over a ``grid_h x grid_w`` patch grid.

    Args:
        grid_h, grid_w: patch-grid size.
        num_mask: target number of masked patches (clipped to the grid size).
        min_num_patches: smallest rectangle area tried.
        max_num_patches: largest rectangle area tried (default: ``num_mask``).
        min_aspect, max_aspect: aspect-ratio range of the rectangles (default
            ``max_aspect = 1 / min_aspect``).
        max_attempts: failed placements tolerated per rectangle before stopping.
        exact: top the mask up with random single patches so it holds exactly
            ``num_mask`` patches (useful when a batch needs equal counts).
        rng: source of randomness (default: the ``random`` module).

    Returns:
        Bool tensor ``(grid_h, grid_w)``, ``True`` where a patch is masked.
    """
    rng = rng or random.Random(random.getrandbits(64))
    num_mask = max(0, min(int(num_mask), grid_h * grid_w))
    max_num_patches = num_mask if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1.0 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros((grid_h, grid_w), dtype=bool)
    count = 0
    while count < num_mask:
        budget = min(num_mask - count, max_num_patches)
        added = 0
        for _ in range(max_attempts):
            area = rng.uniform(min_num_patches, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < grid_h and 0 < w < grid_w:
                top, left = rng.randint(0, grid_h - h), rng.randint(0, grid_w - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    if exact and count < num_mask:
        free = np.flatnonzero(~mask.reshape(-1))
        pick = rng.sample(range(free.size), num_mask - count)
        mask.reshape(-1)[free[pick]] = True
    return torch.from_numpy(mask)


class BlockMaskCollator:
    """Masks for a batch of ``n`` crops: DINOv2's "half the crops, ratios in [0.1, 0.5]" rule.

    Args:
        grid_size: ``(grid_h, grid_w)`` patch grid of the crops.
        mask_probability: fraction of crops that get a mask (``int(n * p)`` of them).
        ratio_range: masked-patch ratio range, stratified over the masked crops.
        min_num_patches, min_aspect: block shape parameters of :func:`block_mask`.
        max_block_frac: largest single block as a fraction of the grid (DINOv2: 0.5).
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        mask_probability: float = 0.5,
        ratio_range: tuple[float, float] = (0.1, 0.5),
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_block_frac: float = 0.5,
    ) -> None:
        if not 0.0 <= mask_probability <= 1.0:
            raise HistofmError(f"mask_probability must be in [0, 1], got {mask_probability}; pass e.g. 0.5.")
        if not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
            raise HistofmError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range}; pass e.g. (0.1, 0.5).")
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.mask_probability = mask_probability
        self.ratio_range = ratio_range
        self.min_num_patches = min_num_patches
        self.min_aspect = min_aspect
        self.max_num_patches = max(1, int(max_block_frac * self.grid_size[0] * self.grid_size[1]))

    def __call__(self, n: int, rng: random.Random | None = None) -> torch.Tensor:
        """Bool masks ``(n, grid_h, grid_w)``; ``int(n * mask_probability)`` of them non-empty."""
        rng = rng or random.Random(random.getrandbits(64))
        gh, gw = self.grid_size
        n_masked = int(n * self.mask_probability)
        lo, hi = self.ratio_range
        edges = np.linspace(lo, hi, n_masked + 1)
        masks = []
        for i in range(n_masked):
            ratio = rng.uniform(edges[i], edges[i + 1])
            masks.append(
                block_mask(
                    gh, gw, int(gh * gw * ratio), min_num_patches=self.min_num_patches,
                    max_num_patches=self.max_num_patches, min_aspect=self.min_aspect, rng=rng,
                )
            )
        masks += [torch.zeros(gh, gw, dtype=torch.bool)] * (n - n_masked)
        rng.shuffle(masks)
        return torch.stack(masks) if masks else torch.zeros(0, gh, gw, dtype=torch.bool)
