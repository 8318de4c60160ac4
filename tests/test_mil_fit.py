"""MIL training through the engine: early stopping keeps the best epoch, bf16, the non-finite guard, exact resume.

Bags are read from disk when needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histofm.errors import HistofmError
from histofm.mil import build_aggregator
from histofm.mil.data import BagDataset
from histofm.mil.train import MILTrainConfig, Targets, validation_loss
from histofm.train.mil import fit_bags


def _noise_bags(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(20, 8, generator=g) for _ in range(n)]


def test_early_stopping_restores_the_best_epoch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    # Labels carry no signal: the model can only memorise the training bags, so the validation
    # loss soon rises and training must stop early with the weights of its best epoch.
    train, val = _noise_bags(24, 0), _noise_bags(12, 1)
    y_train, y_val = [i % 2 for i in range(24)], [i % 2 for i in range(12)]
    cfg = MILTrainConfig(model="abmil", epochs=60, lr=1e-2, batch_size=4, patience=3, seed=0)
    model = build_aggregator("abmil", 8, 2, hidden_dim=32, attn_dim=8, dropout=0.0)
    log = fit_bags(model, train, y_train, cfg, val_bags=val, val_labels=y_val, out_dir=tmp_path)
    assert len(log) < 60  # stopped early
    best = min(log, key=lambda r: r["val_loss"])
    assert log[-1]["epoch"] - best["epoch"] == 3 and all(r["best_epoch"] <= r["epoch"] for r in log)
    assert log[-1]["val_loss"] > best["val_loss"]
    restored = validation_loss(model, val, Targets.classes(y_val), cfg, torch.ones(2), "cpu")
    assert abs(restored - best["val_loss"]) < 1e-6
    # the engine's files: a per-step log with the validation loss at each epoch's end, the aggregator
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len([r for r in steps if "val_loss" in r]) == len(log) and (tmp_path / "aggregator.safetensors").is_file()
    meta = json.loads((tmp_path / "aggregator.json").read_text())
    assert meta["aggregator_class"] == type(model).__name__ and meta["in_dim"] == 8 and meta["best_step"] // 6 == best["epoch"]


def test_a_killed_fit_resumes_exactly(tmp_path: Path) -> None:
    """Interrupted after epoch 2 of 5 (the engine's stop_after), resumed: the same weights and losses, bit for bit."""
    torch.set_num_threads(1)
    bags, val = [b[: 10 + i] for i, b in enumerate(_noise_bags(12, 2))], _noise_bags(6, 3)
    y, yv = [i % 2 for i in range(12)], [i % 2 for i in range(6)]
    cfg = MILTrainConfig(model="abmil", epochs=5, lr=5e-3, batch_size=3, max_tiles=8, patience=0, seed=1,
                         model_kwargs={"dropout": 0.25})  # dropout and tile subsets: random state must resume too

    def run(out: Path, **kw) -> tuple[torch.nn.Module, list[dict]]:
        torch.manual_seed(0)
        model = build_aggregator("abmil", 8, 2, hidden_dim=8, attn_dim=4, dropout=0.25)
        return model, fit_bags(model, bags, y, cfg, val_bags=val, val_labels=yv, out_dir=out, **kw)

    ref, ref_log = run(tmp_path / "ref")
    import histofm.train.mil as engine_mil

    real = engine_mil.engine_config
    engine_mil.engine_config = lambda *a, **k: real(*a, **k).replace(stop_after=8)  # 2 epochs of 4 steps
    try:
        run(tmp_path / "b")
    finally:
        engine_mil.engine_config = real
    model, log = run(tmp_path / "b", resume=True)
    assert log == ref_log
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_bf16_step_and_the_non_finite_guard(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    bags, y = _noise_bags(8, 4), [i % 2 for i in range(8)]
    model = build_aggregator("abmil", 8, 2, hidden_dim=8, attn_dim=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = fit_bags(model, bags, y, MILTrainConfig(epochs=1, batch_size=8, precision="bf16", lr=1e-2))
    assert np.isfinite(log[0]["train_loss"])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())  # autocast, weights stay fp32

    # One slide with a NaN feature: its steps are skipped with a warning, the others train.
    bags[3] = bags[3].clone()
    bags[3][5, 2] = float("nan")
    model = build_aggregator("abmil", 8, 2, hidden_dim=8, attn_dim=4)
    with pytest.warns(UserWarning, match="non-finite loss or gradient at step .*; step skipped"):
        log = fit_bags(model, bags, y, MILTrainConfig(epochs=2, batch_size=1, lr=1e-2))
    assert all(np.isfinite(r["train_loss"]) for r in log)
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
    # Every slide NaN: nothing is learnt, and the engine says so in one sentence.
    model = build_aggregator("abmil", 8, 2, hidden_dim=8, attn_dim=4)
    with pytest.warns(UserWarning), pytest.raises(HistofmError, match="The loss was not finite at any of the 5 steps run, so nothing was learnt"):
        fit_bags(model, [torch.full((4, 8), float("nan"))] * 8, y, MILTrainConfig(epochs=2, batch_size=1))


def test_bags_are_read_when_needed(tmp_path: Path) -> None:
    for i in range(3):
        with h5py.File(tmp_path / f"S{i}.h5", "w") as f:
            f.create_dataset("features", data=np.full((5, 4), i, np.float32))
    bags = BagDataset.from_table(tmp_path, ["S0", "S1.svs", "S2"])
    assert bags.dim == 4 and len(bags) == 3
    assert not any(isinstance(v, (np.ndarray, torch.Tensor)) for v in vars(bags).values())  # paths only
    shutil.copy(tmp_path / "S2.h5", tmp_path / "S1.h5")  # a change on disk shows at the next access
    assert float(bags[1][0, 0]) == 2.0
