"""The engine beyond pretraining: any Objective, periodic evaluation, best weights, early stopping, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from histofm.errors import HistofmError
from histofm.methods.base import SSLMethod
from histofm.train import TrainConfig, fit
from histofm.utils.objective import Objective


class Memorise(Objective):
    """A small MLP on few noisy samples: it first learns the signal, then memorises the noise."""

    export_name = "net"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, batch):
        x, y = batch
        return {"loss": F.mse_loss(self.net(x).squeeze(-1), y)}

    def exported_module(self) -> nn.Module:
        return self.net


def _data(n: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, x[:, 0] - x[:, 1] + noise * torch.randn(n, generator=g)


def _run(tmp_path, name: str, **kw) -> tuple[Memorise, list[dict], dict[int, dict[str, torch.Tensor]]]:
    x, y = _data(16, 1, noise=1.5)
    xv, yv = _data(32, 2, noise=0.0)
    obj, seen = Memorise(), {}

    def evaluate() -> dict[str, float]:
        assert not obj.training and not torch.is_grad_enabled()
        seen[len(seen)] = {k: v.clone() for k, v in obj.state_dict().items()}
        return {"val_loss": float(F.mse_loss(obj.net(xv).squeeze(-1), yv)), "val_other": 1.0}

    cfg = TrainConfig(steps=80, batch_size=4, lr=2e-2, min_lr=2e-2, weight_decay=0.0, out_dir=str(tmp_path / name),
                      ckpt_every=6, log_every=50, eval_every=4, best_metric="val_loss", patience=3,
                      progress=False, tensorboard=False, seed=3, **kw)
    history = fit(obj, [(x[i], y[i]) for i in range(16)], cfg, evaluate=evaluate, label="memorise")
    return obj, history, seen


def test_early_stopping_keeps_the_best_weights(tmp_path) -> None:
    obj, history, seen = _run(tmp_path, "a")
    evals = [h for h in history if "val_loss" in h]
    assert len(history) < 80 and len(evals) == len(seen)  # stopped early
    best = min(range(len(evals)), key=lambda i: evals[i]["val_loss"])
    assert len(evals) - 1 - best == 3  # patience: three evaluations without a lower loss
    assert evals[best]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_loss"] > evals[best]["val_loss"]
    assert evals[-1]["best_step"] == evals[best]["step"] and evals[-1]["best_val_loss"] == evals[best]["val_loss"]
    for k, v in obj.state_dict().items():  # the best evaluation's weights were loaded back
        assert torch.equal(v, seen[best][k])
    meta = json.loads((tmp_path / "a" / "net.json").read_text())
    assert meta["stopped_early"] and meta["best_step"] == evals[best]["step"]
    logged = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val_loss" in r] == [h["step"] for h in evals]  # every evaluation is logged


def test_resume_keeps_best_weights_and_patience(tmp_path) -> None:
    """Interrupted after an improvement and during the patience count, resumed: the same run, bit for bit."""
    ref, ref_hist, _ = _run(tmp_path, "ref")
    evals = [h for h in ref_hist if "val_loss" in h]
    best_step = min(evals, key=lambda h: h["val_loss"])["step"]
    stop = ((best_step + 1) // 6 + 1) * 6  # a checkpoint after the best evaluation, before the stop
    assert stop < len(ref_hist)
    _, part, _ = _run(tmp_path, "b", stop_after=stop)
    assert len(part) == stop
    obj, hist, _ = _run(tmp_path, "b", resume=True)
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]
    assert [h.get("best_step") for h in hist] == [h.get("best_step") for h in ref_hist]
    for k, v in obj.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])
    assert (tmp_path / "b" / "net.safetensors").read_bytes() == (tmp_path / "ref" / "net.safetensors").read_bytes()
    again, hist2, _ = _run(tmp_path, "b", resume=True)  # resuming a finished (stopped) run trains nothing
    assert len(hist2) == len(ref_hist) and all(torch.equal(v, ref.state_dict()[k]) for k, v in again.state_dict().items())


def test_engine_settings_fail_in_one_sentence(tmp_path) -> None:
    with pytest.raises(HistofmError, match="patience needs best_metric"):
        TrainConfig(patience=2)
    obj = Memorise()
    data = [(torch.randn(6), torch.randn(())) for _ in range(8)]
    cfg = TrainConfig(steps=2, batch_size=4, progress=False, best_metric="val_loss")
    class Contrast(SSLMethod):  # a self-supervised method compares the samples of a batch
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(6, 4)

        def forward(self, batch):
            return {"loss": self.backbone(batch[0]).std(0).mean()}

    with pytest.raises(HistofmError, match="batch_size=1 is too small for Contrast, which needs at least 2"):
        fit(Contrast(), data, cfg.replace(best_metric=None, batch_size=1))
    with pytest.raises(HistofmError, match="needs an evaluate callable"):
        fit(obj, data, cfg)
    with pytest.raises(HistofmError, match="best_metric='val_loss' is not among the evaluation's metrics"):
        fit(obj, data, cfg, evaluate=lambda: {"acc": 1.0})
