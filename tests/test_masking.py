"""Block masking (BEiT) and DINOv2's batch rule: counts, shapes, blockiness, reproducibility."""

from __future__ import annotations

import random

import pytest
import torch
from scipy import ndimage

from histofm.errors import HistofmError
from histofm.methods.masking import BlockMaskCollator, block_mask


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (7, 9)])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_block_mask_count_never_exceeds_target_and_gets_close(grid, ratio) -> None:
    rng = random.Random(0)
    n = int(grid[0] * grid[1] * ratio)
    counts = []
    for _ in range(50):
        m = block_mask(*grid, n, max_num_patches=grid[0] * grid[1] // 2, rng=rng)
        assert m.shape == grid and m.dtype == torch.bool
        counts.append(int(m.sum()))
    assert max(counts) <= n
    assert sum(counts) / len(counts) >= 0.85 * n  # BEiT's loop may stop a little short, not far


def test_block_mask_exact_tops_up() -> None:
    rng = random.Random(1)
    for n in (1, 5, 37, 98):
        assert int(block_mask(14, 14, n, exact=True, rng=rng).sum()) == n


def test_block_masks_are_blocks_not_scattered_patches() -> None:
    # A BEiT mask is a union of a few rectangles: far fewer connected components than a
    # random mask with the same number of patches.
    rng = random.Random(2)
    g = torch.Generator().manual_seed(0)
    block_parts, random_parts = [], []
    for _ in range(30):
        m = block_mask(14, 14, 78, max_num_patches=98, rng=rng)
        block_parts.append(ndimage.label(m.numpy())[1])
        r = torch.zeros(196, dtype=torch.bool)
        r[torch.randperm(196, generator=g)[: int(m.sum())]] = True
        random_parts.append(ndimage.label(r.view(14, 14).numpy())[1])
    assert sum(block_parts) / 30 < 0.4 * sum(random_parts) / 30


def test_block_mask_is_reproducible_with_a_seeded_rng() -> None:
    a = block_mask(16, 16, 60, rng=random.Random(5))
    b = block_mask(16, 16, 60, rng=random.Random(5))
    c = block_mask(16, 16, 60, rng=random.Random(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_mask_edge_cases() -> None:
    assert int(block_mask(8, 8, 0).sum()) == 0
    assert int(block_mask(4, 4, 1000, exact=True).sum()) == 16  # clipped to the grid


@pytest.mark.parametrize("n", [2, 8, 33])
def test_collator_masks_half_the_crops_with_ratios_in_range(n) -> None:
    collate = BlockMaskCollator((16, 16), mask_probability=0.5, ratio_range=(0.1, 0.5))
    rng = random.Random(3)
    ratios = []
    for _ in range(20):
        masks = collate(n, rng)
        assert masks.shape == (n, 16, 16) and masks.dtype == torch.bool
        per_crop = masks.flatten(1).float().mean(1)
        assert int((per_crop > 0).sum()) == int(n * 0.5)  # exactly int(n * p) crops masked
        ratios += per_crop[per_crop > 0].tolist()
    assert max(ratios) <= 0.5 + 1e-6 and min(ratios) >= 0.05
    # Stratified ratios cover the range: some below 0.2, some above 0.35.
    assert min(ratios) < 0.2 and max(ratios) > 0.35


def test_collator_positions_are_shuffled() -> None:
    collate = BlockMaskCollator((8, 8), mask_probability=0.5)
    rng = random.Random(4)
    first_masked = [bool(collate(4, rng)[0].any()) for _ in range(40)]
    assert 5 < sum(first_masked) < 35


def test_collator_rejects_bad_arguments() -> None:
    with pytest.raises(HistofmError, match="mask_probability"):
        BlockMaskCollator((8, 8), mask_probability=1.5)
    with pytest.raises(HistofmError, match="ratio_range"):
        BlockMaskCollator((8, 8), ratio_range=(0.6, 0.2))
