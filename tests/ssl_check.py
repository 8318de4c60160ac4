"""Shared by the method tests: a real-tissue kNN check on the bundled HGSC fields.

Task: tissue type, tumour nest (``hgsc_nest``, its left 72%: the right quarter of
that field is stroma) vs stroma (``hgsc_stroma``), from 32 px tiles (16 um). Pretraining and the kNN memory bank use tiles from the top 60% of each
field; the test tiles come from the bottom 40% (held-out region: no shared pixels). Metric: balanced accuracy of a cosine kNN (k = 10,
votes weighted by ``exp(sim / 0.07)``) on the backbone's pooled embedding.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

import histofm
from histofm.data.augment import eval_view
from histofm.data.datasets import bundled_tiles

TILE = SIZE = 32
# (source, x0, x1): the nest field's right quarter is stroma, so nest tiles come from its left 72%.
FIELDS = (("hgsc_nest", 0.0, 0.72), ("hgsc_stroma", 0.0, 1.0))
TRAIN_ROWS, TEST_ROWS = (0.0, 0.6), (0.6, 1.0)


def _tiles(rows: tuple[float, float], stride: int | None = None) -> tuple[ConcatDataset, list[int]]:
    parts, labels = [], []
    for label, (name, x0, x1) in enumerate(FIELDS):
        ds = bundled_tiles(TILE, sources=(name,), region=(x0, rows[0], x1, rows[1]), stride=stride)
        parts.append(ds)
        labels += [label] * len(ds)
    return ConcatDataset(parts), labels


def pretrain_tiles() -> ConcatDataset:
    """Unlabelled pretraining tiles (train rows only, half-overlapping grid)."""
    return _tiles(TRAIN_ROWS, stride=TILE // 2)[0]


@functools.lru_cache(maxsize=1)
def knn_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ev = eval_view(SIZE)
    (tr, ytr), (te, yte) = _tiles(TRAIN_ROWS), _tiles(TEST_ROWS)
    xtr = torch.stack([ev(tr[i]) for i in range(len(tr))])
    xte = torch.stack([ev(te[i]) for i in range(len(te))])
    return xtr, torch.tensor(ytr), xte, torch.tensor(yte)


def knn_balanced_accuracy(
    train: torch.Tensor, ytrain: torch.Tensor, test: torch.Tensor, ytest: torch.Tensor, k: int = 10
) -> float:
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T  # (Nte, Ntr)
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(test), int(ytrain.max()) + 1).scatter_add_(1, ytrain[idx], (top / 0.07).exp())
    pred = votes.argmax(1)
    return float(torch.stack([(pred[ytest == c] == c).float().mean() for c in ytest.unique()]).mean())


@torch.no_grad()
def knn_score(encoder: torch.nn.Module) -> float:
    was = encoder.training
    encoder.eval()
    xtr, ytr, xte, yte = knn_data()
    acc = knn_balanced_accuracy(encoder(xtr), ytr, encoder(xte), yte)
    encoder.train(was)
    return acc


def tiny_vit_kwargs() -> dict:
    """A ViT small enough to train in seconds on 2 CPU cores (32 px, patch 8 -> 16 tokens)."""
    return dict(depth=2, patch_size=8, embed_dim=64, num_heads=2, global_pool="avg")


def tiny_vit() -> torch.nn.Module:
    return histofm.create_model("vit_tiny_patch16_224", img_size=SIZE, **tiny_vit_kwargs())


@contextlib.contextmanager
def one_thread():
    """Run a block with one intra-op thread (tiny models gain nothing from more, and shared CI runners
    with oversubscribed cores slow down many-fold when torch's threads spin), restoring the setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def pretrain_and_score(method: str, overrides: dict, *, steps: int, lr: float, batch_size: int = 64, seed: int = 0):
    """Pretrain ``method`` on the tiny ViT for ``steps`` steps; returns (history, knn at init, knn after)."""
    import copy

    from histofm.methods.registry import build_method
    from histofm.train import TrainConfig, fit

    torch.manual_seed(seed)
    ov = {"backbone": tiny_vit_kwargs(), "augment": "batch", **overrides}
    model, transform = build_method(method, "vit_tiny_patch16_224", img_size=SIZE, overrides=ov)
    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, warmup_steps=steps // 10, weight_decay=0.04, seed=seed,
        monitor_every=steps // 2, monitor_samples=64, progress=False,
    )
    with one_thread():
        before = knn_score(copy.deepcopy(model.backbone))
        history = fit(model, pretrain_tiles(), cfg, transform=transform)
        after = knn_score(model.backbone)
    return history, before, after


def mean_loss(history: list[dict], lo: int, hi: int) -> float:
    vals = [h["loss"] for h in history[lo:hi]]
    return sum(vals) / len(vals)
