"""Mixture of experts: equivalences with the dense MLP, closed-form losses, capacity, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import histofm
from histofm.errors import HistofmError
from histofm.layers.mlp import Mlp, SwiGLUPacked
from histofm.layers.moe import (
    MoEMlp,
    add_aux_losses,
    collect_aux_losses,
    load_balancing_loss,
    router_z_loss,
)
from histofm.methods.base import SSLMethod


@pytest.fixture
def one_thread():
    # Tiny matrices gain nothing from threads; on a busy 2-core box OpenMP spinning slows them a lot.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dense(kind: str, d: int = 16, h: int = 32) -> nn.Module:
    dense = Mlp(d, h) if kind == "mlp" else SwiGLUPacked(d, h)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.3)
    return dense


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_one_expert_equals_dense_mlp(kind: str, capacity_factor: float | None) -> None:
    dense = _dense(kind)
    moe = MoEMlp(16, 32, num_experts=1, top_k=1, capacity_factor=capacity_factor, expert_layer=kind)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 10, 16)
    torch.testing.assert_close(moe(x), dense(x))
    assert float(moe.last_dropped) == 0.0


@pytest.mark.parametrize("top_k", [2, 3])
def test_identical_experts_with_renormalised_top_k_equal_dense_mlp(top_k: int) -> None:
    dense = _dense("mlp")
    moe = MoEMlp(16, 32, num_experts=5, top_k=top_k, capacity_factor=None)
    for e in moe.experts:
        e.load_state_dict(dense.state_dict())
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # a decisive, non-uniform router
    x = torch.randn(4, 7, 16)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)
    # Control: without renormalisation the gates sum to less than one and the output shrinks.
    raw = MoEMlp(16, 32, num_experts=5, top_k=top_k, capacity_factor=None, normalize_gates=False)
    raw.load_state_dict(moe.state_dict())
    assert (raw(x) - dense(x)).abs().max() > 1e-2


def _routed(logit_table: list[list[float]], top_k: int, **kw: object) -> tuple[MoEMlp, torch.Tensor]:
    """A layer whose router gives token ``t`` (the one-hot input ``e_t``) the logits ``logit_table[t]``."""
    T, E = len(logit_table), len(logit_table[0])
    moe = MoEMlp(T, 8, num_experts=E, top_k=top_k, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor(logit_table).T)  # (E, D=T)
    return moe, torch.eye(T)


def test_balancing_loss_matches_closed_form_on_hand_made_routings() -> None:
    # Top-1, E = 2, four tokens. Probabilities chosen by hand:
    #   token:   0    1    2    3
    #   p(e0):  0.9  0.8  0.7  0.4   -> argmax: e0, e0, e0, e1  => f = (3/4, 1/4)
    #   P = mean probabilities = (0.7, 0.3);  L = E * sum f P = 2 * (0.525 + 0.075) = 1.2
    probs = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]]
    moe, x = _routed([[math.log(a), math.log(b)] for a, b in probs], top_k=1, capacity_factor=None)
    moe(x)
    assert moe.pop_aux_losses()["balance"].item() == pytest.approx(1.2, abs=1e-5)
    assert moe.last_load.tolist() == pytest.approx([0.75, 0.25])

    # Top-2 of E = 4, two tokens: assignments {0, 1} and {0, 2} => f = (2, 1, 1, 0) / 4.
    # P = mean of (0.4, 0.3, 0.2, 0.1) and (0.5, 0.1, 0.3, 0.1) = (0.45, 0.2, 0.25, 0.1)
    # L = 4 * (0.5*0.45 + 0.25*0.2 + 0.25*0.25 + 0) = 4 * 0.3375 = 1.35
    probs2 = [[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]]
    moe2, x2 = _routed([[math.log(p) for p in row] for row in probs2], top_k=2, capacity_factor=None)
    moe2(x2)
    assert moe2.pop_aux_losses()["balance"].item() == pytest.approx(1.35, abs=1e-5)

    # Extremes: perfectly uniform routing gives 1, total collapse onto one expert gives E.
    E = 4
    uniform = torch.full((8, E), 1 / E)
    even = torch.arange(8).remainder(E)[:, None]
    assert load_balancing_loss(uniform, even, E).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), E).float()
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), E).item() == pytest.approx(E)


def test_router_z_loss_closed_form() -> None:
    # Zero logits over E experts: logsumexp = log E for every token.
    assert router_z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2, rel=1e-6)
    # One token with logits (log 1, log 3): logsumexp = log 4.
    assert router_z_loss(torch.tensor([[0.0, math.log(3.0)]])).item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)


def test_capacity_drops_second_choices_before_first_choices() -> None:
    # E = 2, top-2, 4 tokens, C = ceil(0.5 * 4 * 2 / 2) = 2 per expert. Preferences (first, second):
    # t0 (e0, e1), t1 (e0, e1), t2 (e1, e0), t3 (e0, e1).
    # First choices in token order: e0 <- t0, t1 (t3 dropped: e0 full); e1 <- t2.
    # Second choices: e1 <- t0 (now full), t1 dropped; e0 <- t2 dropped (full); t3 dropped.
    table = [[2.0, 0.0], [1.0, 0.0], [0.0, 1.5], [3.0, 0.0]]
    moe, x = _routed(table, top_k=2, capacity_factor=0.5)
    assert moe.capacity(4) == 2
    with torch.no_grad():
        for e in moe.experts:
            for p in e.parameters():
                p.normal_(0, 0.5)
        out = moe(x)
        p = torch.tensor(table).softmax(-1)  # top-2 of 2 experts: renormalised gates are the probs
        f0, f1 = moe.experts[0](x), moe.experts[1](x)
    expected = torch.stack([
        p[0, 0] * f0[0] + p[0, 1] * f1[0],
        p[1, 0] * f0[1],
        p[2, 1] * f1[2],
        torch.zeros(x.shape[1]),
    ])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert float(moe.last_dropped) == pytest.approx(4 / 8)


def _load_cv(load: torch.Tensor) -> float:
    return float(load.std(unbiased=False) / load.mean())


def _train_router(balance_weight: float, steps: int = 150) -> tuple[float, float]:
    """Fit an MoE to a random teacher from a router biased towards expert 0; CV of load before/after."""
    torch.manual_seed(0)
    D, E, T = 16, 8, 512
    mu = torch.randn(D)
    mu = 2.0 * mu / mu.norm()
    x = torch.randn(T, D) * 0.5 + mu  # tokens share a common direction ...
    teacher = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, D))
    with torch.no_grad():
        y = teacher(x)
    moe = MoEMlp(D, 32, num_experts=E, top_k=2, capacity_factor=None)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.1)
        moe.router.weight[0] += 1.5 * mu  # ... that the router sends to expert 0 first
    moe(x)
    moe.pop_aux_losses()
    before = _load_cv(moe.last_load)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    for _ in range(steps):
        out = moe(x)
        loss = F.mse_loss(out, y) + balance_weight * moe.pop_aux_losses()["balance"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        moe(x)
    return before, _load_cv(moe.last_load)


def test_balancing_loss_spreads_the_expert_load(one_thread) -> None:
    before, after = _train_router(balance_weight=0.1)
    _, control = _train_router(balance_weight=0.0)
    assert before > 1.0  # the starting router is badly unbalanced
    assert after < 0.3 * before, (before, after)
    assert after < 0.5 * control, (after, control)  # it is the balancing loss that does it


def test_aux_losses_accumulate_over_calls_and_reach_the_router() -> None:
    model = histofm.create_model("vit_tiny_patch16_224", depth=4, img_size=32, patch_size=8,
                                 moe_every=2, num_experts=4, top_k=2)
    moes = [m for m in model.modules() if isinstance(m, MoEMlp)]
    assert len(moes) == 2
    assert isinstance(model.blocks[1].mlp, MoEMlp) and isinstance(model.blocks[0].mlp, Mlp)
    x = torch.randn(4, 3, 32, 32)
    model(x)
    single = collect_aux_losses(model, reset=False)
    model(x)  # second identical call: per-call means stay the same
    both = collect_aux_losses(model)
    torch.testing.assert_close(both["aux_moe_balance"], single["aux_moe_balance"])
    assert collect_aux_losses(model) == {}  # cleared after collection
    with torch.no_grad():
        model(x)  # inference (or an EMA teacher) records nothing
    assert collect_aux_losses(model) == {}
    # 2 layers, weights 1e-3: logsumexp of 4 logits is >= log 4 + their mean, and close to it at init.
    floor = 2 * 1e-3 * math.log(4) ** 2
    assert floor * 0.9 < both["aux_moe_z"].item() < floor * 1.5
    assert 2 * 0.01 * 0.99 < both["aux_moe_balance"].item() < 2 * 0.01 * 1.5  # L_bal >= 1 per layer

    out = add_aux_losses({"loss": model(x).pow(2).mean()}, model)
    out["loss"].backward()
    assert set(out) == {"loss", "aux_moe_balance", "aux_moe_z"}
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in moes)


def test_activation_checkpointing_counts_aux_losses_once() -> None:
    torch.manual_seed(0)
    model = histofm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8,
                                 moe_every=1, num_experts=4, top_k=2).train()
    x = torch.randn(3, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        # Without early stop, the recomputation in backward re-runs every MoE forward in full.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            out = add_aux_losses({"loss": model(x).pow(2).mean()}, model)
            out["loss"].backward()
        assert all(m.aux_calls == 0 for m in model.modules() if isinstance(m, MoEMlp))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0])


class _WithMoEAux(SSLMethod):
    """Any SSL method plus the MoE auxiliary losses of its networks."""

    def __init__(self, inner: SSLMethod) -> None:
        super().__init__()
        self.inner = inner
        self.backbone = inner.backbone

    def forward(self, batch: object) -> dict[str, torch.Tensor]:
        return add_aux_losses(self.inner(batch), self.inner)

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.inner.on_step_end(step, max_steps)


def test_tiny_moe_vit_pretrains_with_simclr_from_the_engine(one_thread) -> None:
    from histofm.data.datasets import bundled_tiles
    from histofm.methods.simclr import build
    from histofm.train import TrainConfig, fit

    torch.manual_seed(0)
    method, transform = build(
        "simclr", "vit_tiny_patch16_224", img_size=32,
        overrides={"backbone.depth": 2, "backbone.patch_size": 8, "backbone.moe_every": 2,
                   "backbone.num_experts": 4, "backbone.top_k": 2, "proj_hidden_dim": 128, "proj_dim": 32},
    )
    assert isinstance(method.backbone.blocks[1].mlp, MoEMlp)
    router0 = method.backbone.blocks[1].mlp.router.weight.detach().clone()
    data = bundled_tiles(64, sources=("hgsc_nest", "hgsc_stroma"), out_size=32)
    cfg = TrainConfig(steps=30, batch_size=32, lr=1e-3, warmup_steps=5, weight_decay=0.01, device="cpu",
                      progress=False, tensorboard=False, monitor_every=0, log_every=1, out_dir=None)
    hist = fit(_WithMoEAux(method), data, cfg, transform=transform)
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert last < math.log(2 * 32 - 1) - 0.2  # better than identical embeddings for every view
    assert all("aux_moe_balance" in h and "aux_moe_z" in h for h in hist)
    assert not torch.equal(router0, method.backbone.blocks[1].mlp.router.weight)


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(HistofmError, match="top_k"):
        MoEMlp(8, 16, num_experts=2, top_k=3)
    with pytest.raises(HistofmError, match="expert_layer"):
        MoEMlp(8, 16, expert_layer="conv")
    with pytest.raises(HistofmError, match="moe_every"):
        histofm.create_model("vit_tiny_patch16_224", depth=2, moe_every=-1)
