"""The real-pixel MIL task: tumour-nest tiles planted at a low witness rate among real stroma and skin tiles.

Tiles are real H&E pixels from the bundled images, embedded by a frozen random-init
ViT (see ``histofm.eval.mil_task``). At a 1 % witness rate (one tumour tile in a
bag of 80-120), mean pooling dilutes the signal; max pooling and the attention
aggregators must beat it on held-out bags from the other half of every image and
rank the planted tiles first (by their own scores, or by occlusion where those are not
what the model decides by). TransMIL does not (docs/evaluation.md gives the numbers).
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
#: rate each keeps the test short). TransMIL does not beat mean pooling at 1 % (see the docs; torchmil's
#: TransMIL does not either), so it is not here.
CHOSEN_LR = {"max": 2e-3, "abmil": 2e-3, "clam_sb": 2e-3, "dsmil": 5e-4, "transformer": 8e-3}

#: Test AUROC floors (measured: max 0.73, abmil 0.66, clam_sb 0.68, dsmil 0.74, transformer 0.55). The
#: transformer at its chosen 8e-3 is the weakest of them on test (0.55 [0.44, 0.66]; 0.69 at 2e-3),
#: though not on validation (0.75), and on two more seeds it scored 0.67 and 0.71 (docs/evaluation.md).
AUROC_FLOOR = {"transformer": 0.5}

#: Aggregators whose own tile scores are not what they decide by: at 8e-3 the transformer moves the
#: witness's content into other tokens through self-attention, and its pooling weights rank the planted
#: tile first in 0 % of positive bags, while occlusion (dropping the tile) finds it in 40 %.
OWN_SCORES_UNREAD = {"transformer"}


def test_aggregators_beat_mean_pooling_and_find_the_planted_tiles(pools) -> None:
    assert set(CHOSEN_LR.values()) <= set(LR_GRID)
    results = {}
    for lr in sorted(set(CHOSEN_LR.values())):
        names = ["mean"] * (lr == 2e-3) + [n for n, v in CHOSEN_LR.items() if v == lr]
        results.update({r.aggregator: r for r in run_mil_task(
            names, rates=[RATE], lrs=(lr,), n_boot=100, pools=pools, occlusion=bool(OWN_SCORES_UNREAD & set(names)))})
    mean = results.pop("mean")
    assert set(results) == set(CHOSEN_LR)
    for name, r in results.items():
        assert r.losses[-1] < r.losses[0] - 0.2, (name, r.losses)  # it learned
        assert r.val_auroc > 0.65, (name, r.val_auroc)  # on the validation bags too, not only on test (0.71-0.76)
        assert r.auroc > mean.auroc + 0.05, (name, r.auroc, mean.auroc)  # mean pooling: 0.42, at chance
        assert r.auroc > AUROC_FLOOR.get(name, 0.6) and r.ci_low < r.auroc < r.ci_high, r
        # One of 80-120 tiles is planted: a random ranking puts it first about 1 % of the time.
        # Own scores measured 0.32-0.56; the transformer's 0.00, but by occlusion 0.40 (occlusion is
        # computed only where it is asserted, to keep the test short).
        if name in OWN_SCORES_UNREAD:
            assert r.occlusion_topk > 0.2, (name, r.occlusion_topk)
        else:
            assert r.topk_precision > 0.2, (name, r.topk_precision)


def test_occlusion_scores_find_the_tile_a_model_decides_by() -> None:
    from histofm.eval.mil_task import occlusion_scores
    from histofm.mil import build_aggregator

    torch.manual_seed(0)
    model = build_aggregator("max", in_dim=3, num_classes=2, hidden_dim=4, dropout=0.0)
    bag = torch.randn(6, 3)
    with torch.no_grad():
        inst = model.classifier(model.fc(bag))  # (6, 2) tile logits
    margin = (inst[:, 1] - inst[:, 0]).numpy()
    occ = occlusion_scores(model, [bag])[0]
    assert occlusion_scores(model, [bag], np.array([0])) == [None]  # negatives are skipped when labels are given
    top = int(margin.argmax())
    # Max pooling decides by its most positive tile only: dropping it lowers the log-odds to the
    # runner-up's, dropping any other tile changes nothing.
    runner_up = np.sort(margin)[-2]
    np.testing.assert_allclose(occ[top], margin[top] - runner_up, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.delete(occ, top), 0.0, atol=1e-6)


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
