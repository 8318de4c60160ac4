"""fit(): early stopping on the validation loss keeps the best epoch; bags are read from disk when needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import torch

from histofm.mil import build_aggregator
from histofm.mil.data import BagDataset
from histofm.mil.train import MILTrainConfig, Targets, fit, validation_loss


def test_early_stopping_restores_the_best_epoch() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    # Labels carry no signal: the model can only memorise the training bags, so the validation
    # loss soon rises and training must stop early with the weights of its best epoch.
    train = [torch.randn(20, 8, generator=g) for _ in range(24)]
    val = [torch.randn(20, 8, generator=g) for _ in range(12)]
    y_train, y_val = [i % 2 for i in range(24)], [i % 2 for i in range(12)]
    cfg = MILTrainConfig(model="abmil", epochs=60, lr=1e-2, batch_size=4, patience=3, seed=0)
    model = build_aggregator("abmil", 8, 2, hidden_dim=32, attn_dim=8, dropout=0.0)
    log: list[dict] = []
    history = fit(model, train, y_train, cfg, val_bags=val, val_labels=y_val, log=log.append)
    assert len(history) == len(log) < 60  # stopped early
    best = min(log, key=lambda r: r["val_loss"])
    assert log[-1]["epoch"] - best["epoch"] == 3 and all(r["best_epoch"] <= r["epoch"] for r in log)
    assert log[-1]["val_loss"] > best["val_loss"]
    restored = validation_loss(model, val, Targets.classes(y_val), cfg, torch.ones(2), "cpu")
    assert abs(restored - best["val_loss"]) < 1e-6


def test_bags_are_read_when_needed(tmp_path: Path) -> None:
    for i in range(3):
        with h5py.File(tmp_path / f"S{i}.h5", "w") as f:
            f.create_dataset("features", data=np.full((5, 4), i, np.float32))
    bags = BagDataset.from_table(tmp_path, ["S0", "S1.svs", "S2"])
    assert bags.dim == 4 and len(bags) == 3
    assert not any(isinstance(v, (np.ndarray, torch.Tensor)) for v in vars(bags).values())  # paths only
    shutil.copy(tmp_path / "S2.h5", tmp_path / "S1.h5")  # a change on disk shows at the next access
    assert float(bags[1][0, 0]) == 2.0
