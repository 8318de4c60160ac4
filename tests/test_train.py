"""The training engine: schedules, parameter groups, EMA, collapse watch, exact resume, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import histofm
from histofm import HistofmError
from histofm.methods.base import SSLMethod
from histofm.train import (
    TrainConfig,
    collapse_stats,
    cosine_schedule,
    ema_update,
    fit,
    load_backbone,
    make_teacher,
    momentum_schedule,
    param_groups,
    read_log,
)


@pytest.fixture(autouse=True)
def _one_thread():
    from ssl_check import one_thread

    with one_thread():
        yield


def _tiny_vit(**kw):
    return histofm.create_model(
        "vit_tiny_patch16_224", depth=1, img_size=16, patch_size=8, embed_dim=32, num_heads=2, **kw
    )


class NoisyRegression(SSLMethod):
    """A toy method with randomness in forward (dropout, noise) and a buffer updated per step."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _tiny_vit(drop_rate=0.1)
        self.head = nn.Linear(32, 4)
        self.register_buffer("running", torch.zeros(4))

    def forward(self, batch):
        x, target = batch
        z = self.head(self.backbone(x + 0.05 * torch.randn_like(x)))  # (B, 4)
        loss = F.mse_loss(z, target)
        return {"loss": loss, "aux_dummy": z.detach().abs().mean()}

    @torch.no_grad()
    def on_step_end(self, step, max_steps):
        self.running.mul_(0.9).add_(0.1 * self.head.bias)


def _dataset(n=48):
    g = torch.Generator().manual_seed(3)
    xs = torch.rand(n, 3, 16, 16, generator=g)
    targets = torch.stack([xs.mean((1, 2, 3)), xs[:, 0].mean((1, 2)), xs[:, 1].std((1, 2)), xs[:, 2].amax((1, 2))], 1)
    return [(xs[i], targets[i]) for i in range(n)]


def _augment(x):
    # Randomness in the per-sample transform, so resume must restore augmentation seeds too.
    return torch.flip(x, dims=[2]) if torch.rand(()) < 0.5 else x


def _cfg(tmp_path, **kw):
    base = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, out_dir=str(tmp_path), ckpt_every=4,
                log_every=1, monitor_every=4, monitor_samples=16, progress=False, seed=5)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------ schedules
def test_cosine_schedule_warmup_and_end() -> None:
    vals = [cosine_schedule(t, 100, 1.0, 0.1, warmup_steps=10, warmup_start=0.0) for t in range(101)]
    assert vals[0] == 0.0 and vals[5] == pytest.approx(0.5) and vals[10] == pytest.approx(1.0)
    assert vals[100] == pytest.approx(0.1)
    assert vals[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))  # non-increasing after warm-up
    m = [momentum_schedule(t, 50, 0.99) for t in range(51)]
    assert m[0] == pytest.approx(0.99) and m[-1] == pytest.approx(1.0) and all(a <= b for a, b in zip(m, m[1:]))


# ------------------------------------------------------------- param groups, EMA
def test_param_groups_exempt_norms_biases_and_tokens() -> None:
    vit = _tiny_vit()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(vit)}
    names = {id(p): n for n, p in vit.named_parameters()}
    no_decay = {names[i] for i in groups["no_decay"]}
    decay = {names[i] for i in groups["decay"]}
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"} <= decay
    assert not decay & no_decay and len(decay) + len(no_decay) == len(names)


def test_ema_update_formula() -> None:
    student = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(2.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    torch.testing.assert_close(teacher[1].running_mean, torch.full((3,), 0.2))


# ---------------------------------------------------------------- collapse watch
def test_collapse_stats_tell_collapse_from_spread() -> None:
    g = torch.Generator().manual_seed(0)
    spread = collapse_stats(torch.randn(256, 64, generator=g))
    collapsed = collapse_stats(torch.randn(1, 64, generator=g).repeat(256, 1) + 1e-4 * torch.randn(256, 64, generator=g))
    assert spread["embed_std"] == pytest.approx(1 / 8, rel=0.1) and spread["embed_std_ref"] == pytest.approx(1 / 8)
    assert collapsed["embed_std"] < 0.01
    assert spread["rankme"] > 40 and collapsed["rankme"] < spread["rankme"] / 2
    line = torch.randn(256, 1, generator=g) * torch.randn(1, 64, generator=g)  # rank one
    assert collapse_stats(line)["rankme"] < 1.5


# ------------------------------------------------------------- loop and resume
def test_fit_learns_logs_and_exports(tmp_path) -> None:
    torch.manual_seed(0)
    method = NoisyRegression()
    hist = fit(method, _dataset(), _cfg(tmp_path, steps=30), transform=_augment)
    assert [h["step"] for h in hist] == list(range(30))
    first, last = sum(h["loss"] for h in hist[:5]) / 5, sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.5 * first
    assert "aux_dummy" in hist[0] and "rankme" in hist[0] and "embed_std" in hist[4]
    assert hist[3]["lr"] < hist[2]["lr"] and hist[0]["lr"] == 0.0  # warm-up then cosine
    log = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in log] == list(range(30)) and "samples_per_sec" in log[0]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["arch"] == "vit_tiny_patch16_224" and meta["overrides"]["img_size"] == 16
    reloaded = histofm.create_model(meta["arch"], checkpoint_path=tmp_path / "backbone.safetensors", **meta["overrides"])
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(reloaded(x), method.backbone.eval()(x))
    torch.testing.assert_close(load_backbone(tmp_path)(x), method.backbone(x))


def test_resume_reproduces_uninterrupted_run(tmp_path) -> None:
    torch.manual_seed(0)
    full = NoisyRegression()
    torch.manual_seed(0)
    part = NoisyRegression()
    ref = fit(full, _dataset(), _cfg(tmp_path / "a", steps=14), transform=_augment)
    # Interrupt after step 9 (last checkpoint at 8), then resume in a fresh process-like state.
    cut = fit(part, _dataset(), _cfg(tmp_path / "b", steps=14, stop_after=9), transform=_augment)
    assert len(cut) == 9
    torch.manual_seed(123)  # the resumed run must not depend on the caller's random state
    fresh = NoisyRegression()
    resumed = fit(fresh, _dataset(), _cfg(tmp_path / "b", steps=14, resume=True), transform=_augment)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in ref]  # bit-identical
    assert [h.get("rankme") for h in resumed] == [h.get("rankme") for h in ref]
    for (n, a), b in zip(full.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert [r["step"] for r in read_log(tmp_path / "b" / "log.jsonl")] == list(range(14))


def test_bf16_autocast_on_cpu(tmp_path) -> None:
    torch.manual_seed(0)
    hist = fit(NoisyRegression(), _dataset(), _cfg(tmp_path, steps=6, precision="bf16", out_dir=None))
    assert all(math.isfinite(h["loss"]) for h in hist)


class SometimesNaN(NoisyRegression):
    def __init__(self, bad_steps) -> None:
        super().__init__()
        self.bad, self.calls = set(bad_steps), 0

    def forward(self, batch):
        out = super().forward(batch)
        self.calls += 1
        if self.calls - 1 in self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_steps_are_skipped_then_stop_cleanly(tmp_path) -> None:
    torch.manual_seed(0)
    m = SometimesNaN({2})
    with pytest.warns(UserWarning, match="non-finite"):
        hist = fit(m, _dataset(), _cfg(tmp_path / "a", steps=5))
    assert [h["skipped"] for h in hist] == [False, False, True, False, False]
    torch.manual_seed(0)
    m = SometimesNaN(set(range(3, 100)))
    with pytest.warns(UserWarning), pytest.raises(HistofmError, match="not finite for 3 steps"):
        fit(m, _dataset(), _cfg(tmp_path / "b", steps=20, max_nonfinite=3))
    weights = load_backbone(tmp_path / "b").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert (tmp_path / "b" / "checkpoint.pt").is_file()


def test_bad_input_gives_one_clear_sentence(tmp_path) -> None:
    with pytest.raises(HistofmError, match="Unknown option"):
        TrainConfig().replace(learning_rate=1.0)
    with pytest.raises(HistofmError, match="precision"):
        TrainConfig(precision="fp8")
    assert TrainConfig().replace(lr="0.1", progress="false", grad_clip="none") == TrainConfig(
        lr=0.1, progress=False, grad_clip=None
    )
    with pytest.raises(HistofmError, match="fewer than one batch"):
        fit(NoisyRegression(), _dataset(4), _cfg(tmp_path))
    with pytest.raises(HistofmError, match="SSLMethod"):
        fit(nn.Linear(2, 2), _dataset(), _cfg(tmp_path))  # type: ignore[arg-type]
    from histofm.data.datasets import bundled_tiles

    with pytest.raises(HistofmError, match="view transform"):
        fit(NoisyRegression(), bundled_tiles(256), _cfg(tmp_path))
    with pytest.raises(HistofmError, match="resume=True needs out_dir"):
        TrainConfig(resume=True)
