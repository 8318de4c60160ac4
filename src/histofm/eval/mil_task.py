"""A real-pixel multiple-instance task: find a few tumour-nest tiles planted in bags of other tissue.

Tiles are cut on a grid from the bundled H&E images (``tile`` px, about 0.5 um/px):

* **background**: the HGSC stroma field, the CMU-1 skin slide (tissue tiles only) and the
  tiles of the HGSC tumour-nest field that hold *no* neoplastic nucleus pixel (stroma and
  inflammatory regions of that field), so that a witness cannot be recognised merely as
  "from the nest image";
* **witness**: tiles of the tumour-nest field where labelled neoplastic nucleus pixels
  (the bundled type mask) cover at least ``min_tumour`` of the tile.

A positive bag holds ``round(rate * size)`` witnesses (at least one) among background
tiles; a negative bag holds none. Training and validation bags are drawn from the left
half of every image and test bags from the right half, so no pixel is shared.

Features come from a **frozen, randomly initialised** small ViT (seeded): a fixed
encoder that no one tuned to this task, so the test measures the aggregators, not the
encoder; features are standardised with the training half's mean and deviation.
Random-init ViT features already separate tumour-nest tiles from the rest tile by
tile (a linear probe: AUROC 0.99 on the test half); the difficulty is the bag level: at 1-2 % witnesses mean pooling
dilutes the signal, and an aggregator must find the few tiles that matter.

The training half is split once more: bags for fitting come from the ``fit`` tiles and
validation bags from the ``val`` tiles (every third band of four tile rows, see
:func:`split_mask`). :func:`run_mil_task` gives every aggregator the same budget
(:data:`TRAIN_BUDGET`: 30 epochs, the epoch with the lowest validation loss kept) and the
same learning-rate grid (:data:`LR_GRID`), keeps the run with the lowest validation loss,
and only then scores the test bags: slide AUROC with a bootstrap interval over test bags,
and the top-``k`` precision of its tile scores on the positive test bags (``k`` = planted
tiles; random ranking scores about the rate), both of its own scores (attention weights,
tile evidence) and of leave-one-out occlusion (:func:`occlusion_scores`, which tiles the
model actually decides by). No setting is chosen on the test half.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from histofm.errors import HistofmError

BACKGROUND_SOURCES = ("hgsc_stroma", "cmu_small_region", "hgsc_nest")


@dataclass(frozen=True)
class TilePools:
    """Embedded tiles of the task.

    Attributes:
        features: ``(n, D)`` float32 tile embeddings.
        witness: ``(n,)`` True for tumour-nest tiles.
        train: ``(n,)`` True for tiles of the left half of their image.
        source: ``(n,)`` index into ``sources``.
        sources: names of the bundled images.
        coords: ``(n, 2)`` top-left ``(x, y)`` in the source image.
        tile: tile side in pixels.
    """

    features: np.ndarray
    witness: np.ndarray
    train: np.ndarray
    source: np.ndarray
    sources: tuple[str, ...]
    coords: np.ndarray
    tile: int = 48


def _grid_tiles(name: str, tile: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Grid tiles ``(n, tile, tile, 3)`` with at least half tissue, their ``(x, y)`` and the image width."""
    from histofm.data.datasets import _load_sample, tissue_pixels

    img = _load_sample(name)
    h, w = img.shape[:2]
    ys, xs = np.meshgrid(np.arange(0, h - tile + 1, tile), np.arange(0, w - tile + 1, tile), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    tiles = np.stack([img[y : y + tile, x : x + tile] for x, y in coords])
    keep = tissue_pixels(tiles).mean((1, 2)) >= 0.5
    return tiles[keep], coords[keep], w


def _tumour_fraction(coords: np.ndarray, tile: int) -> np.ndarray:
    """Fraction of each nest tile covered by labelled neoplastic nucleus pixels (type 3)."""
    from histofm.data import sample_path

    types = np.load(sample_path("hgsc_nest_type_mask"))["nuc_raster"]
    return np.array([(types[y : y + tile, x : x + tile] == 3).mean() for x, y in coords])


@functools.lru_cache(maxsize=2)
def tile_pools(
    tile: int = 48,
    min_tumour: float = 0.1,
    encoder: str = "vit_tiny_patch8_224",
    encoder_kwargs: tuple[tuple[str, Any], ...] = (("depth", 2), ("embed_dim", 96), ("num_heads", 2)),
    seed: int = 0,
) -> TilePools:
    """Cut, label and embed the tiles (cached per process); see the module docstring."""
    from histofm.eval.embed import embed_images
    from histofm.registry import create_model, model_info
    from histofm.utils import seed_everything

    if not 16 <= tile <= 256:
        raise HistofmError(f"The MIL task's tile side must be 16-256 px, got {tile}.")
    parts_tiles, parts_witness, parts_train, parts_source, parts_coords = [], [], [], [], []
    for i, name in enumerate(BACKGROUND_SOURCES):
        tiles, coords, width = _grid_tiles(name, tile)
        if name == "hgsc_nest":
            frac = _tumour_fraction(coords, tile)
            witness = frac >= min_tumour
            keep = witness | (frac == 0)  # tiles with a little tumour are neither witness nor background
            tiles, coords, witness = tiles[keep], coords[keep], witness[keep]
        else:
            witness = np.zeros(len(tiles), dtype=bool)
        parts_tiles.append(tiles)
        parts_witness.append(witness)
        parts_train.append(coords[:, 0] + tile <= width // 2)
        parts_source.append(np.full(len(tiles), i))
        parts_coords.append(coords)
        # Tiles straddling the middle belong to neither split.
        straddle = (coords[:, 0] < width // 2) & (coords[:, 0] + tile > width // 2)
        parts_source[-1] = np.where(straddle, -1, parts_source[-1])
    tiles = np.concatenate(parts_tiles)
    source = np.concatenate(parts_source)
    seed_everything(seed)
    model = create_model(encoder, img_size=tile, **dict(encoder_kwargs))
    info = model_info(encoder)
    features = embed_images(model, torch.from_numpy(tiles), info.mean, info.std)
    keep = source >= 0
    train = np.concatenate(parts_train)
    # Standardise with the training half's statistics: random-init features share a large common
    # component that small aggregators would otherwise spend their first epochs removing.
    ref = features[keep & train]
    features = ((features - ref.mean(0)) / (ref.std(0) + 1e-6)).astype(np.float32)
    return TilePools(
        features=features[keep], witness=np.concatenate(parts_witness)[keep], train=train[keep],
        source=source[keep], sources=BACKGROUND_SOURCES, coords=np.concatenate(parts_coords)[keep], tile=tile,
    )


SPLITS = ("train", "test", "fit", "val")


def split_mask(pools: TilePools, split: str) -> np.ndarray:
    """Tiles ``(n,)`` of a split: ``train`` / ``test`` halves, and ``fit`` / ``val`` inside the training half.

    ``val`` holds the training-half tiles in every third band of four tile rows (bands
    ``y // (4 tile) = 1, 4, 7, ...``, a third of the half, about 40 witnesses), ``fit`` the rest:
    settings are chosen by fitting on ``fit`` bags and scoring ``val`` bags, so the test half
    is never looked at.
    """
    if split == "test":
        return ~pools.train
    if split == "train":
        return pools.train
    band = (pools.coords[:, 1] // (4 * pools.tile)) % 3 == 1
    return pools.train & (band if split == "val" else ~band)


def make_bags(
    pools: TilePools,
    n_bags: int,
    rate: float,
    split: str = "train",
    size: tuple[int, int] = (80, 120),
    seed: int = 0,
    order: str = "random",
) -> tuple[list[torch.Tensor], np.ndarray, list[np.ndarray]]:
    """Bags ``(N_i, D)``, labels ``(n_bags,)`` (every second bag positive) and planted masks ``(N_i,)``.

    A positive bag of ``N`` tiles holds ``max(1, round(rate * N))`` witnesses; tiles are
    drawn without replacement within a bag from the ``split`` half of the images. ``order``
    (see :data:`TILE_ORDERS`): ``"random"`` presents them in a random order, ``"coords"`` in the
    order a tiler writes them (image, then row, then column); the tiles are the same.
    """
    bg, wit = _split_tiles(pools, rate, split, size, order)
    rng = np.random.default_rng(seed)
    bags, labels, planted = [], [], []
    for i in range(n_bags):
        idx = _draw_bag(pools, bg, wit, rng, rate, size, positive=i % 2 == 1, order=order)
        bags.append(torch.from_numpy(pools.features[idx]))
        labels.append(i % 2)
        planted.append(pools.witness[idx])
    return bags, np.asarray(labels), planted


#: How a bag presents its tiles: ``random`` (a random order), ``coords`` (image, row, column).
TILE_ORDERS = ("random", "coords")


def _split_tiles(
    pools: TilePools, rate: float, split: str, size: tuple[int, int], order: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the background and witness tiles of a split, after checking the bag settings
    (refuses a rate outside (0, 1), an unknown split or order, and splits too small for a bag)."""
    if not 0 < rate < 1:
        raise HistofmError(f"The witness rate must be between 0 and 1, got {rate}.")
    if split not in SPLITS:
        raise HistofmError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    if order not in TILE_ORDERS:
        raise HistofmError(f"The tile order must be one of {', '.join(TILE_ORDERS)}, got {order!r}.")
    side = split_mask(pools, split)
    bg = np.flatnonzero(side & ~pools.witness)
    wit = np.flatnonzero(side & pools.witness)
    if len(wit) == 0 or len(bg) < size[1]:
        raise HistofmError(f"Too few tiles for {split} bags ({len(wit)} witnesses, {len(bg)} background tiles).")
    return bg, wit


def _draw_bag(
    pools: TilePools, bg: np.ndarray, wit: np.ndarray, rng: np.random.Generator, rate: float,
    size: tuple[int, int], positive: bool, order: str,
) -> np.ndarray:
    """Tile indices ``(N,)`` of one bag (see :func:`make_bags`)."""
    n = int(rng.integers(size[0], size[1] + 1))
    k = max(1, round(rate * n)) if positive else 0
    idx = np.concatenate([rng.choice(bg, n - k, replace=False), rng.choice(wit, k, replace=k > len(wit))])
    idx = idx[rng.permutation(n)]
    if order == "coords":
        xy = pools.coords[idx]
        idx = idx[np.lexsort((xy[:, 0], xy[:, 1], pools.source[idx]))]  # last key sorts first
    return idx


class ResampledBags(Sequence[torch.Tensor]):
    """Training bags drawn anew every time one is read: an unlimited training set with fixed labels.

    Bag ``i`` keeps its label (every second bag positive, as in :func:`make_bags`); its tiles
    are drawn from the ``split`` tiles each time it is read, from a generator seeded by
    ``(seed, i, how often bag i was read before)``, so a run is repeatable. A diagnostic:
    with it no aggregator can memorise training bags, so whether it learns tells whether
    optimisation or the number of bags is what holds it back.
    """

    def __init__(
        self, pools: TilePools, n_bags: int, rate: float, split: str = "fit", size: tuple[int, int] = (80, 120),
        seed: int = 0, order: str = "random",
    ) -> None:
        self.bg, self.wit = _split_tiles(pools, rate, split, size, order)  # the same checks as fixed bags
        self.pools, self.n_bags, self.rate, self.size, self.seed, self.order = pools, n_bags, rate, size, seed, order
        self.reads = [0] * n_bags
        self.labels = np.arange(n_bags) % 2

    def __len__(self) -> int:
        return self.n_bags

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        rng = np.random.default_rng((self.seed, i, self.reads[i]))
        self.reads[i] += 1
        idx = _draw_bag(self.pools, self.bg, self.wit, rng, self.rate, self.size, bool(self.labels[i]), self.order)
        return torch.from_numpy(self.pools.features[idx])


def topk_precision(scores: list[np.ndarray | None], planted: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean, over positive bags, of the fraction of planted tiles among the top-``k`` scores (``k`` = planted)."""
    values = []
    for s, p, y in zip(scores, planted, labels):
        if y != 1 or s is None:
            continue
        k = int(p.sum())
        values.append(p[np.argsort(-s, kind="stable")[:k]].mean())
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def occlusion_scores(
    model: torch.nn.Module, bags: list[torch.Tensor], labels: np.ndarray | None = None
) -> list[np.ndarray | None]:
    """How much each tile raises the bag's positive log-odds: ``f(bag) - f(bag without the tile)``, ``(N_i,)`` per bag.

    A readout of which tiles a trained aggregator *uses*, the same for every aggregator,
    whether or not it has attention weights and whether or not they are what it decides by
    (a Transformer can move a tile's content into other tokens before pooling). The ``N``
    leave-one-out bags of ``N - 1`` tiles go through the model as one batch of equal size.
    With ``labels``, only positive bags are scored (``None`` for the others: top-``k``
    precision reads positive bags only).
    """
    model.eval()
    out: list[np.ndarray | None] = []
    for i, bag in enumerate(bags):
        if labels is not None and labels[i] != 1:
            out.append(None)
            continue
        n = bag.shape[0]
        full = model(bag.unsqueeze(0)).logits  # (1, 2)
        keep = ~torch.eye(n, dtype=torch.bool)  # (n, n): row i drops tile i
        loo = bag.unsqueeze(0).expand(n, -1, -1)[keep].view(n, n - 1, -1)  # (n, n-1, D)
        logits = model(loo).logits  # (n, 2)
        out.append(((full[:, 1] - full[:, 0]) - (logits[:, 1] - logits[:, 0])).double().numpy())
    return out


#: Aggregator sizes that train in seconds on CPU. Every aggregator gets the same training budget
#: (:data:`TRAIN_BUDGET`) and the same learning-rate grid (:data:`LR_GRID`), chosen on validation bags.
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "mean": dict(hidden_dim=32),
    "max": dict(hidden_dim=32),
    "abmil": dict(hidden_dim=32, attn_dim=16),
    "clam_sb": dict(hidden_dim=32, attn_dim=16),
    "dsmil": dict(hidden_dim=32, query_dim=16),
    "transformer": dict(dim=32, num_heads=2),
    "transmil": dict(dim=32, num_heads=2, num_landmarks=32),
}

#: Training settings shared by every aggregator: ``epochs`` passes in batches of 16 bags, and the
#: weights of the epoch with the lowest validation loss are kept. No early stop (``patience=0``):
#: max pooling can sit at chance for ten epochs before its witness tile takes over.
TRAIN_BUDGET: dict[str, Any] = dict(epochs=30, patience=0, batch_size=16)

#: Learning rates tried for every aggregator; the one with the lowest validation loss is kept.
LR_GRID: tuple[float, ...] = (5e-4, 2e-3, 8e-3)


@dataclass(frozen=True)
class MILTaskResult:
    """One aggregator at one witness rate.

    Attributes:
        aggregator, rate: what was run.
        auroc, ci_low, ci_high: test slide AUROC and its 95 % bootstrap interval over test bags.
        topk_precision: top-``k`` precision of the aggregator's own tile scores on positive test bags
            (NaN without scores).
        occlusion_topk: top-``k`` precision of :func:`occlusion_scores` on positive test bags.
        lr: the learning rate chosen on validation.
        best_epoch: the epoch (from 1) whose weights were kept.
        val_loss, val_auroc: the chosen run's validation loss and AUROC.
        losses: training loss per epoch of the chosen run.
    """

    aggregator: str
    rate: float
    auroc: float
    ci_low: float
    ci_high: float
    topk_precision: float
    occlusion_topk: float = float("nan")
    lr: float = float("nan")
    best_epoch: int = 0
    val_loss: float = float("nan")
    val_auroc: float = float("nan")
    losses: list[float] = field(default_factory=list)


def run_mil_task(
    aggregators: tuple[str, ...] | list[str] = tuple(DEFAULT_SETTINGS),
    rates: tuple[float, ...] | list[float] = (0.01, 0.02, 0.05, 0.1),
    n_train: int = 160,
    n_val: int = 100,
    n_test: int = 100,
    n_boot: int = 500,
    seed: int = 0,
    settings: dict[str, dict[str, Any]] | None = None,
    lrs: tuple[float, ...] | list[float] = LR_GRID,
    budget: dict[str, Any] | None = None,
    pools: TilePools | None = None,
    occlusion: bool = True,
    tile_order: str = "random",
    resample_train: bool = False,
) -> list[MILTaskResult]:
    """Train, select and test each aggregator at each witness rate.

    Per rate: ``n_train`` bags from the ``fit`` tiles, ``n_val`` from the ``val`` tiles (both
    in the training half) and ``n_test`` from the test half. Each aggregator is trained once
    per learning rate in ``lrs`` with the same ``budget`` (:data:`TRAIN_BUDGET`), keeping the
    epoch with the lowest validation loss; the run with the lowest validation loss is tested:
    slide AUROC with a 95 % bootstrap interval, and the top-``k`` precision of its own tile
    scores and (``occlusion=True``) of :func:`occlusion_scores`.

    ``tile_order="random"`` (the protocol) presents every bag's tiles in a random order and
    reshuffles training bags every epoch; ``"coords"`` presents every bag in the tiler's order
    (image, row, column) and keeps it. ``resample_train=True`` draws every training bag anew
    each time it is read (:class:`ResampledBags`, a diagnostic, not the protocol).
    """
    from histofm.eval.metrics import binary_auroc, bootstrap_ci
    from histofm.mil import build_aggregator
    from histofm.mil.train import MILTrainConfig, predict
    from histofm.train.mil import fit_bags

    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    budget = {**TRAIN_BUDGET, **(budget or {})}
    if not lrs:
        raise HistofmError("The MIL task needs at least one learning rate in lrs.")
    pools = pools if pools is not None else tile_pools()
    results = []
    for rate in rates:
        train = make_bags(pools, n_train, rate, "fit", seed=seed, order=tile_order)
        val = make_bags(pools, n_val, rate, "val", seed=seed + 2, order=tile_order)
        test = make_bags(pools, n_test, rate, "test", seed=seed + 1, order=tile_order)
        for name in aggregators:
            if name not in settings:
                raise HistofmError(f"No MIL task settings for aggregator {name!r}; choose from {', '.join(settings)}.")
            model_kwargs = settings[name]
            best: tuple[float, Any, float, int, list[float]] | None = None
            for lr in lrs:
                torch.manual_seed(seed)
                model = build_aggregator(name, in_dim=pools.features.shape[1], num_classes=2, **model_kwargs)
                cfg = MILTrainConfig(model=name, model_kwargs=model_kwargs, seed=seed, lr=lr, **budget)
                # Resampled bags start afresh for every run, so each one sees the same stream of bags.
                bags: Sequence[torch.Tensor] = (ResampledBags(pools, n_train, rate, "fit", seed=seed, order=tile_order)
                                                if resample_train else train[0])
                records = fit_bags(model, bags, train[1].tolist(), cfg, val_bags=val[0],
                                   val_labels=val[1].tolist(), shuffle_tiles=tile_order == "random")
                losses = [r["train_loss"] for r in records]
                val_loss = min(r["val_loss"] for r in records)
                if best is None or val_loss < best[0]:
                    best = (val_loss, model, lr, int(records[-1]["best_epoch"]) + 1, losses)
            assert best is not None
            val_loss, model, lr, best_epoch, losses = best
            val_probs, _ = predict(model, val[0])
            probs, scores = predict(model, test[0])
            auc = binary_auroc(test[1], probs[:, 1])
            lo, hi = bootstrap_ci(test[1], [probs], lambda t, p: binary_auroc(t, p[:, 1]), n_boot=n_boot, seed=seed)
            results.append(MILTaskResult(
                name, rate, auc, lo, hi, topk_precision(scores, test[2], test[1]),
                occlusion_topk=topk_precision(occlusion_scores(model, test[0], test[1]), test[2], test[1])
                if occlusion else float("nan"), lr=lr,
                best_epoch=best_epoch,
                val_loss=val_loss, val_auroc=binary_auroc(val[1], val_probs[:, 1]), losses=losses,
            ))
    return results
