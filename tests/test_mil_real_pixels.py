"""The real-pixel MIL task: tumour-nest tiles planted at a low witness rate among real stroma and skin tiles.

Tiles are real H&E pixels from the bundled images, embedded by a frozen random-init
ViT (see ``histofm.eval.mil_task``). At a 1 % witness rate (one tumour tile in a
bag of 80-120), mean pooling dilutes the signal; max pooling and the attention
aggregators must beat it on held-out bags from the other half of every image and
rank the planted tiles first. TransMIL does not (docs/evaluation.md gives the numbers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histofm.errors import HistofmError
from histofm.eval.mil_task import (
    LR_GRID,
    make_bags,
    run_mil_task,
    split_mask,
    tile_pools,
    topk_precision,
)

RATE = 0.01


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pools():
    return tile_pools()


def test_tiles_are_real_labelled_and_split_by_region(pools) -> None:
    from histofm.data.datasets import _load_sample

    assert pools.features.dtype == np.float32 and np.isfinite(pools.features).all()
    assert 50 < int((pools.witness & pools.train).sum()) and 50 < int((pools.witness & ~pools.train).sum())
    assert set(np.unique(pools.source[pools.witness])) == {pools.sources.index("hgsc_nest")}
    # Background comes from all three images, the nest field included (no "which image" shortcut).
    assert set(np.unique(pools.source[~pools.witness])) == {0, 1, 2}
    for i, name in enumerate(pools.sources):  # train tiles lie in the left half, test tiles in the right half
        half = _load_sample(name).shape[1] // 2
        x = pools.coords[pools.source == i, 0]
        side = pools.train[pools.source == i]
        assert (x[side] + 48 <= half).all() and (x[~side] >= half).all()
    # Validation tiles: a third of the training half, in bands of rows, with witnesses of their own.
    fit, val = split_mask(pools, "fit"), split_mask(pools, "val")
    assert not (fit & val).any() and ((fit | val) == pools.train).all()
    assert 30 < int((val & pools.witness).sum()) < int((fit & pools.witness).sum())
    bags, labels, planted = make_bags(pools, 10, RATE, "test", seed=3)
    assert labels.tolist() == [0, 1] * 5
    for b, y, p in zip(bags, labels, planted):
        assert 80 <= len(b) <= 120 and int(p.sum()) == (max(1, round(RATE * len(b))) if y else 0)


def test_topk_precision() -> None:
    planted = [np.array([0, 1, 0, 1]), np.array([1, 0, 0, 0]), np.array([0, 0, 0, 0])]
    scores = [np.array([0.1, 0.9, 0.2, 0.8]), np.array([0.1, 0.9, 0.2, 0.3]), np.array([1.0, 0, 0, 0])]
    assert topk_precision(scores, planted, np.array([1, 1, 0])) == 0.5  # (2/2 + 0/1) / 2; negatives ignored


#: The aggregators that beat mean pooling at 1 % in the documented run (docs/evaluation.md), each at the
#: learning rate its validation bags chose at this rate (``run_mil_task`` tries all of ``LR_GRID``; one
#: rate each keeps the test short). The transformer (validation chose 8e-3: test 0.44) and TransMIL do
#: not beat mean pooling at 1 % (see the docs).
CHOSEN_LR = {"max": 2e-3, "abmil": 2e-3, "clam_sb": 2e-3, "dsmil": 5e-4}


def test_aggregators_beat_mean_pooling_and_find_the_planted_tiles(pools) -> None:
    assert set(CHOSEN_LR.values()) <= set(LR_GRID)
    results = {}
    for lr in sorted(set(CHOSEN_LR.values())):
        names = ["mean"] * (lr == 2e-3) + [n for n, v in CHOSEN_LR.items() if v == lr]
        results.update({r.aggregator: r for r in run_mil_task(names, rates=[RATE], lrs=(lr,), n_boot=100,
                                                               pools=pools)})
    mean = results.pop("mean")
    for name, r in results.items():
        assert r.losses[-1] < r.losses[0] - 0.2, (name, r.losses)  # it learned
        assert r.val_auroc > 0.65, (name, r.val_auroc)  # on the validation bags too, not only on test (0.71-0.76)
        assert r.auroc > mean.auroc + 0.05, (name, r.auroc, mean.auroc)  # mean pooling: 0.42, at chance
        assert r.auroc > 0.6 and r.ci_low < r.auroc < r.ci_high, r  # measured 0.65-0.74
        # One of 80-120 tiles is planted: a random ranking puts it first about 1 % of the time (measured 0.32-0.56).
        assert r.topk_precision > 0.2, (name, r.topk_precision)


def test_shuffled_tiles_keep_their_tiles_in_a_new_order() -> None:
    from histofm.mil.train import TileSubset

    bag = torch.arange(100.0).view(50, 2)
    shuffle = TileSubset(shuffle=True)
    a, b = shuffle(bag), shuffle(bag)
    assert not torch.equal(a, b) and not torch.equal(a, bag)
    torch.testing.assert_close(a[a[:, 0].argsort()], bag)
    assert TileSubset()(bag) is bag  # neither subset nor shuffle: the bag as it is
    sub = TileSubset(max_tiles=7, shuffle=True)(bag)
    assert sub.shape == (7, 2) and len(set(sub[:, 0].tolist())) == 7


def test_bad_input(pools) -> None:
    with pytest.raises(HistofmError, match="witness rate"):
        make_bags(pools, 4, 1.5)
    with pytest.raises(HistofmError, match="split"):
        make_bags(pools, 4, 0.1, split="validation")
    with pytest.raises(HistofmError, match="aggregator"):
        run_mil_task(["no_such_pooling"], rates=[0.1], n_train=4, n_val=4, n_test=4, pools=pools)
    with pytest.raises(HistofmError, match="learning rate"):
        run_mil_task(["mean"], rates=[0.1], n_train=4, n_val=4, n_test=4, lrs=(), pools=pools)
