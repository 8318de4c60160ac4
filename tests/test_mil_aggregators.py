"""MIL aggregators: shapes, padding invariance, gradients, Nystrom attention, bad input."""

from __future__ import annotations

import pytest
import torch

from histofm import HistofmError
from histofm.mil import build_aggregator, list_aggregators
from histofm.mil.transmil import NystromAttention, iterative_pinv, segment_means


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    # These models are tiny: one thread avoids OpenMP overhead and contention on shared CI cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


OURS = ["mean", "max", "abmil", "abmil_plain", "clam_sb", "clam_mb", "dsmil", "transformer", "transmil"]
SMALL = {
    "transmil": dict(dim=32, num_heads=2, num_landmarks=8),
    "transformer": dict(dim=32, num_heads=2),
    "mean": dict(hidden_dim=16),
    "max": dict(hidden_dim=16),
}


def _build(name: str, in_dim: int = 12, num_classes: int = 3) -> torch.nn.Module:
    return build_aggregator(name, in_dim, num_classes, **SMALL.get(name, {}))


def test_registry_has_every_aggregator() -> None:
    assert set(OURS) <= set(list_aggregators())


@pytest.mark.parametrize("name", OURS)
def test_padded_batch_equals_bag_by_bag(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name).eval()
    sizes = [30, 11, 1]
    bags = [torch.randn(n, 12) for n in sizes]
    x = torch.zeros(3, 30, 12)
    mask = torch.zeros(3, 30, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        x[i, len(b) :] = 100.0  # garbage in the padding must not leak into the result
        mask[i, : len(b)] = True
    with torch.no_grad():
        out = model(x, mask)
        assert out.logits.shape == (3, 3)
        assert out.scores is not None and out.scores.shape == (3, 30)
        for i, b in enumerate(bags):
            alone = model(b)  # (N, D) is promoted to one bag
            torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.scores[i, : len(b)], alone.scores[0], atol=1e-5, rtol=1e-5)
            padded = out.scores[i, len(b) :]
            assert bool(((padded == 0) | (padded == float("-inf"))).all())


@pytest.mark.parametrize("name", OURS)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name, num_classes=2).train()
    x = torch.randn(4, 40, 12)
    mask = torch.ones(4, 40, dtype=torch.bool)
    mask[1, 25:] = False
    labels = torch.tensor([0, 1, 1, 0])
    out = model(x, mask, labels=labels)
    loss = torch.nn.functional.cross_entropy(out.logits, labels)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    if name in ("clam_sb", "clam_mb", "dsmil"):
        assert out.aux_loss is not None and out.aux_loss.ndim == 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_clam_instance_loss_uses_true_class_only_without_subtyping() -> None:
    torch.manual_seed(0)
    model = build_aggregator("clam_sb", 12, 3, k_sample=4)
    out = model(torch.randn(1, 20, 12), labels=torch.tensor([2]))
    out.aux_loss.backward()
    grads = [p.weight.grad for p in model.instance_classifiers]
    assert grads[0] is None and grads[1] is None and grads[2].abs().sum() > 0
    assert model(torch.randn(1, 20, 12)).aux_loss is None  # no labels, no instance loss
    model = build_aggregator("clam_mb", 12, 3, k_sample=4, subtyping=True)
    model(torch.randn(1, 20, 12), labels=torch.tensor([2])).aux_loss.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in model.instance_classifiers)


def test_abmil_attention_is_a_softmax_over_the_bag() -> None:
    model = build_aggregator("abmil", 12, 2).eval()
    x = torch.randn(2, 15, 12)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, 9:] = False
    a = model(x, mask).scores
    torch.testing.assert_close(a.sum(1), torch.ones(2))
    assert bool((a[1, 9:] == 0).all())


def test_dsmil_critical_instance_gets_the_highest_self_attention() -> None:
    # The attention of a tile to the critical tile is <q_n, q_m>; with one tile this is a softmax of one.
    model = build_aggregator("dsmil", 12, 2).eval()
    out = model(torch.randn(1, 1, 12))
    torch.testing.assert_close(out.scores, torch.ones(1, 1))


# ----------------------------------------------------------------------------- Nystrom attention
def test_iterative_pinv_matches_torch_pinv() -> None:
    torch.manual_seed(0)
    kernel = torch.softmax(torch.randn(2, 3, 16, 16), dim=-1)  # like softmax(Q~ K~^T)
    torch.testing.assert_close(iterative_pinv(kernel, 20), torch.linalg.pinv(kernel), atol=1e-3, rtol=1e-3)


def test_segment_means() -> None:
    x = torch.arange(10.0).view(1, 10, 1)
    # 10 positions into 4 segments of sizes 3, 2, 3, 2 (floor(i * 4 / 10)).
    torch.testing.assert_close(segment_means(x, 4).flatten(), torch.tensor([1.0, 3.5, 6.0, 8.5]))
    torch.testing.assert_close(segment_means(x, 5).flatten(), torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5]))


def _exact_attention(attn: NystromAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = attn.qkv(x).unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) * attn.head_dim**-0.5, dim=-1)
    return attn.proj((a @ v).transpose(1, 2).flatten(2)), a


def test_nystrom_is_exact_when_every_token_is_a_landmark() -> None:
    torch.manual_seed(0)
    attn = NystromAttention(32, num_heads=4, head_dim=8, num_landmarks=64, pinv_iterations=30, residual_kernel=0).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    out, first = attn(x, first_token_scores=True)
    ref, a = _exact_attention(attn, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(first, a[:, :, 0].mean(1), atol=1e-6, rtol=1e-6)


def test_nystrom_first_row_matches_the_materialised_approximation() -> None:
    torch.manual_seed(0)
    attn = NystromAttention(16, num_heads=2, head_dim=8, num_landmarks=5, residual_kernel=0).double()
    x = torch.randn(1, 37, 16, dtype=torch.float64)
    q, k, _ = attn.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
    ql, kl = segment_means(q, 5), segment_means(k, 5)
    s = 8**-0.5
    inv = iterative_pinv(torch.softmax(ql @ kl.transpose(-1, -2) * s, -1))
    full = torch.softmax(q @ kl.transpose(-1, -2) * s, -1) @ inv @ torch.softmax(ql @ k.transpose(-1, -2) * s, -1)
    row = NystromAttention._first_row(q[:, :, :1], k, ql, kl, inv, s, chunk=8)  # several chunks
    torch.testing.assert_close(row, full[:, :, 0].mean(1), atol=1e-8, rtol=1e-8)
    # The approximation is close to exact attention on smooth inputs.
    _, first = attn(x, first_token_scores=True)
    _, a = _exact_attention(attn, x)
    assert (first - a[:, :, 0].mean(1)).abs().max() < 0.05


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_one_clear_error() -> None:
    model = build_aggregator("abmil", 12, 2)
    with pytest.raises(HistofmError, match="dimension 7"):
        model(torch.randn(1, 5, 7))
    with pytest.raises(HistofmError, match=r"\(B, N, D\)"):
        model(torch.randn(5))
    with pytest.raises(HistofmError, match="mask must have shape"):
        model(torch.randn(2, 5, 12), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(HistofmError, match="no unmasked tile"):
        model(torch.randn(2, 5, 12), torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(HistofmError, match="no tiles"):
        model(torch.randn(1, 0, 12))
    with pytest.raises(HistofmError, match="did you mean abmil"):
        build_aggregator("abmill", 12, 2)
    with pytest.raises(HistofmError, match="does not accept"):
        build_aggregator("abmil", 12, 2, heads=3)
    with pytest.raises(HistofmError, match="in_dim > 0"):
        build_aggregator("abmil", 0, 2)
