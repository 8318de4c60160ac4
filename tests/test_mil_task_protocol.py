"""Protocol options of the real-pixel MIL task: the tiler's tile order and an unlimited training set.

Both are checked without training (milliseconds once the tiles are embedded): the tiles of a
bag in the tiler's order are exactly those of the random order, and resampled training bags
keep their labels and their witness counts while their tiles change at every read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histofm.errors import HistofmError
from histofm.eval.mil_task import ResampledBags, make_bags, run_mil_task, split_mask, tile_pools


@pytest.fixture(scope="module")
def pools():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tile_pools()
    torch.set_num_threads(n)


def _indices(pools, bag: torch.Tensor) -> np.ndarray:
    """Pool index of every tile of a bag (tile features are unique)."""
    where = {row.tobytes(): i for i, row in enumerate(pools.features)}
    return np.array([where[row.tobytes()] for row in bag.numpy()])


def test_tiles_in_the_tilers_order_are_the_same_tiles(pools) -> None:
    assert len({row.tobytes() for row in pools.features}) == len(pools.features)  # _indices is exact
    rand = make_bags(pools, 6, 0.05, "val", seed=4)
    coords = make_bags(pools, 6, 0.05, "val", seed=4, order="coords")
    assert (rand[1] == coords[1]).all()
    for a, b, pa, pb in zip(rand[0], coords[0], rand[2], coords[2]):
        ia, ib = _indices(pools, a), _indices(pools, b)
        assert sorted(ia) == sorted(ib) and not (ia == ib).all() and pa.sum() == pb.sum()
        # image first, then row, then column: what a tiler writes
        key = [(pools.source[i], pools.coords[i, 1], pools.coords[i, 0]) for i in ib]
        assert key == sorted(key)
    with pytest.raises(HistofmError, match="tile order"):
        make_bags(pools, 2, 0.05, order="spiral")


def test_resampled_bags_keep_labels_and_witness_counts_but_change_tiles(pools) -> None:
    bags = ResampledBags(pools, 4, 0.02, "fit", seed=1)
    assert len(bags) == 4 and bags.labels.tolist() == [0, 1, 0, 1]
    fit = split_mask(pools, "fit")
    for i in range(4):
        first, second = _indices(pools, bags[i]), _indices(pools, bags[i])
        assert set(first) != set(second)  # a new bag at every read
        for idx in (first, second):
            assert fit[idx].all() and 80 <= len(idx) <= 120 and len(set(idx[~pools.witness[idx]])) == int((~pools.witness[idx]).sum())
            assert int(pools.witness[idx].sum()) == (max(1, round(0.02 * len(idx))) if i % 2 else 0)
    again = ResampledBags(pools, 4, 0.02, "fit", seed=1)  # repeatable: the same reads give the same bags
    assert torch.equal(again[3], ResampledBags(pools, 4, 0.02, "fit", seed=1)[3])
    coords = ResampledBags(pools, 2, 0.02, "fit", seed=1, order="coords")
    ib = _indices(pools, coords[1])
    key = [(pools.source[i], pools.coords[i, 1], pools.coords[i, 0]) for i in ib]
    assert key == sorted(key)
    with pytest.raises(HistofmError, match="witness rate"):
        ResampledBags(pools, 4, 0.0)


def test_run_mil_task_with_either_option_is_repeatable(pools) -> None:
    kw = dict(rates=[0.05], n_train=16, n_val=8, n_test=8, n_boot=10, lrs=(2e-3,), budget={"epochs": 2},
              pools=pools, occlusion=False)
    for options in ({"tile_order": "coords"}, {"resample_train": True}):
        a, b = run_mil_task(["mean", "mean"], **kw, **options)  # two runs in one call
        assert a.losses == b.losses and a.auroc == b.auroc, options  # resampled bags start afresh every run
    fixed = run_mil_task(["mean"], **kw)[0]
    assert fixed.losses != run_mil_task(["mean"], **kw, resample_train=True)[0].losses
    with pytest.raises(HistofmError, match="tile order"):
        run_mil_task(["mean"], **{**kw, "tile_order": "grid"})
