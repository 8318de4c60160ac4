"""Mixture-of-experts MIL: the mixture formula, padding, gradients, and planted-signal bags."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from histofm import HistofmError
from histofm.eval.metrics import binary_auroc
from histofm.mil import build_aggregator
from histofm.mil.train import MILTrainConfig, predict
from histofm.train.mil import fit_bags

DIMS = (12, 8)  # two "foundation models": the first sees nothing, the second sees the planted tiles
SMALL = dict(hidden_dim=32, attn_dim=16, dropout=0.0)


def _build(**kw: object) -> torch.nn.Module:
    return build_aggregator("moe", sum(DIMS), 2, feature_dims=DIMS, expert_kwargs=SMALL, **kw)


@pytest.fixture
def one_thread():
    # Tiny matrices gain nothing from threads; on a busy 2-core box OpenMP spinning slows them a lot.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_bags(n: int, seed: int) -> tuple[list[torch.Tensor], list[int]]:
    """64-160 tiles of N(0, I) features per bag; positive bags have 3-8 tiles shifted by 4 along
    a fixed direction, in the SECOND feature set only (the first is pure noise for every bag)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(DIMS[1], generator=torch.Generator().manual_seed(123))
    u = u / u.norm()
    bags, labels = [], []
    for i in range(n):
        size = int(torch.randint(64, 161, (1,), generator=g))
        x = torch.randn(size, sum(DIMS), generator=g)
        if i % 2:
            k = int(torch.randint(3, 9, (1,), generator=g))
            idx = torch.randperm(size, generator=g)[:k]
            x[idx, DIMS[0] :] += 4.0 * u
        bags.append(x)
        labels.append(i % 2)
    return bags, labels


def test_moe_trusts_the_informative_feature_set_and_finds_planted_signal(one_thread) -> None:
    train_x, train_y = make_bags(160, seed=0)
    test_x, test_y = make_bags(64, seed=1)
    torch.manual_seed(0)
    model = _build()
    history = fit_bags(model, train_x, train_y, MILTrainConfig(model="moe", epochs=10, batch_size=16, lr=5e-3, seed=0))
    assert history[-1]["train_loss"] < 0.25 * history[0]["train_loss"]
    probs, scores = predict(model, test_x)
    auc = binary_auroc(test_y, probs[:, 1])
    assert auc >= 0.95, f"held-out AUROC {auc:.3f}"
    with torch.no_grad():
        gates = torch.cat([model.gates(b[None], torch.ones(1, len(b), dtype=torch.bool))[1].exp() for b in test_x])
    assert gates[:, 1].mean() > 0.7, gates.mean(0)  # the router learned which encoder to trust
    assert all(s is not None and abs(s.sum() - 1) < 1e-4 for s in scores)


def test_dense_output_is_the_mixture_of_expert_predictions() -> None:
    torch.manual_seed(0)
    model = _build().eval()
    with torch.no_grad():
        model.router.weight.normal_()  # a non-uniform router
        x = torch.randn(3, 20, sum(DIMS))
        out = model(x)
        router_in = model.router_norm(x.mean(1))
        g = model.router(router_in).softmax(-1)  # (B, E)
        p = [F.softmax(e(part).logits, -1) for e, part in zip(model.experts, x.split(DIMS, -1))]
        mixture = g[:, :1] * p[0] + g[:, 1:] * p[1]
        a = [e(part).scores for e, part in zip(model.experts, x.split(DIMS, -1))]
    torch.testing.assert_close(out.logits.softmax(-1), mixture, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.scores, g[:, :1] * a[0] + g[:, 1:] * a[1], atol=1e-6, rtol=1e-5)


def test_top2_of_3_mixes_the_two_chosen_experts_and_adds_a_balancing_loss() -> None:
    torch.manual_seed(0)
    model = build_aggregator("moe", 12, 2, num_experts=3, top_k=2, expert_kwargs=SMALL).eval()
    with torch.no_grad():
        model.router.weight.normal_()
        x = torch.randn(6, 15, 12)
        out = model(x)
        logits = model.router(model.router_norm(x.mean(1)))  # (B, 3)
        probs = logits.softmax(-1)
        top, chosen = probs.topk(2, dim=-1)
        gates = top / top.sum(-1, keepdim=True)
        p = torch.stack([F.softmax(e(x).logits, -1) for e in model.experts], 1)  # (B, 3, C)
        rows = torch.arange(6)
        mixture = gates[:, :1] * p[rows, chosen[:, 0]] + gates[:, 1:] * p[rows, chosen[:, 1]]
    torch.testing.assert_close(out.logits.softmax(-1), mixture, atol=1e-6, rtol=1e-5)
    # aux = w_z * mean(lse^2) + w_bal * E * sum_i f_i P_i, written out from the router logits.
    f = torch.bincount(chosen.flatten(), minlength=3).float() / chosen.numel()
    expected = 1e-3 * logits.logsumexp(-1).square().mean() + 0.01 * 3 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(out.aux_loss, expected)


def test_padded_batch_equals_bag_by_bag() -> None:
    torch.manual_seed(0)
    model = build_aggregator("moe", sum(DIMS), 2, num_experts=3, top_k=2, expert_kwargs=SMALL).eval()
    with torch.no_grad():
        model.router.weight.normal_()  # sparse routing that differs between bags
    sizes = [30, 11, 1]
    bags = [torch.randn(n, sum(DIMS)) for n in sizes]
    x = torch.full((3, 30, sum(DIMS)), 100.0)  # garbage padding
    mask = torch.zeros(3, 30, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    with torch.no_grad():
        out = model(x, mask)
        for i, b in enumerate(bags):
            alone = model(b)
            torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.scores[i, : len(b)], alone.scores[0], atol=1e-5, rtol=1e-5)
            assert bool((out.scores[i, len(b) :] == 0).all())


@pytest.mark.parametrize("expert", ["abmil", "clam_sb"])
def test_every_parameter_gets_a_gradient(expert: str) -> None:
    torch.manual_seed(0)
    kw = SMALL if expert == "abmil" else dict(hidden_dim=32, attn_dim=16, k_sample=4)
    model = build_aggregator("moe", 12, 2, num_experts=3, expert=expert, expert_kwargs=kw).train()
    x = torch.randn(4, 30, 12)
    mask = torch.ones(4, 30, dtype=torch.bool)
    mask[2, 10:] = False
    labels = torch.tensor([0, 1, 1, 0])
    out = model(x, mask, labels=labels)
    (F.cross_entropy(out.logits, labels) + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_bad_options_fail_clearly() -> None:
    with pytest.raises(HistofmError, match="add up to in_dim=20"):
        build_aggregator("moe", 20, 2, feature_dims=(12, 9))
    with pytest.raises(HistofmError, match="top_k"):
        build_aggregator("moe", 20, 2, feature_dims=(12, 8), top_k=3)
    with pytest.raises(HistofmError, match="between 2"):
        build_aggregator("moe", 20, 2, num_experts=4, top_k=1)
    with pytest.raises(HistofmError, match="cannot use 'moe' experts"):
        build_aggregator("moe", 20, 2, expert="moe")
    with pytest.raises(HistofmError, match="dimension 7"):
        _build()(torch.randn(1, 5, 7))
