"""MoCo v2 (queue, lightly parity) and v3 (paper's pseudo-code parity), momentum schedule (learning on the nucleus task: tests/test_learning.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss as LightlyNTXent

from histofm.methods.moco import MoCo, MoCoConfig, moco_v2_loss, moco_v3_ctr
from histofm.methods.registry import build_method
from ssl_check import tiny_vit, tiny_vit_kwargs


@pytest.mark.parametrize("temperature", [0.07, 0.2, 0.5])
@pytest.mark.parametrize("batch", [4, 8])
def test_v2_loss_and_queue_match_lightly_memory_bank(temperature: float, batch: int) -> None:
    K, D = 4 * batch, 16
    g = torch.Generator().manual_seed(batch)
    ref = LightlyNTXent(temperature=temperature, memory_bank_size=(K, D))
    queue = F.normalize(torch.randn(K, D, generator=g), dim=1)
    ref.memory_bank.bank.copy_(queue)
    ptr = 0
    for _ in range(6):  # more steps than the queue holds: checks the FIFO wrap-around too
        q = torch.randn(batch, D, generator=g, requires_grad=True)
        k = torch.randn(batch, D, generator=g)
        ours = moco_v2_loss(q, k, queue, temperature)
        (gq,) = torch.autograd.grad(ours, q)
        theirs = ref(q, k)
        (rq,) = torch.autograd.grad(theirs, q)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gq, rq, rtol=1e-4, atol=1e-6)
        queue = queue.clone()
        queue[ptr : ptr + batch] = F.normalize(k, dim=1)  # MoCo's enqueue, as in the module
        ptr = (ptr + batch) % K


def _paper_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    # MoCo v3, Algorithm 1: logits = mm(q, k.t()); loss = CrossEntropyLoss(logits / tau, range(N)) * 2 * tau
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return F.cross_entropy(q @ k.T / tau, torch.arange(q.shape[0])) * 2 * tau


@pytest.mark.parametrize("tau", [0.1, 0.2, 1.0])
def test_v3_ctr_matches_the_paper(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 8, generator=g, requires_grad=True)
    k = torch.randn(12, 8, generator=g)
    ours, ref = moco_v3_ctr(q, k, tau), _paper_ctr(q, k, tau)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, q)[0], torch.autograd.grad(ref, q)[0])


def test_v3_forward_is_symmetric_ctr_and_momentum_follows_cosine() -> None:
    torch.manual_seed(0)
    m = MoCo(tiny_vit(), MoCoConfig(version=3, proj_hidden_dim=32, proj_dim=16, proj_layers=3, proj_bn=True,
                                    proj_last_bn=True, pred_hidden_dim=32, momentum=0.99, momentum_final=1.0))
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    out = m([x1, x2])
    with torch.no_grad():
        q = m.predictor(m.projector(m.backbone(torch.cat([x1, x2]))))
        k = m.momentum_projector(m.momentum_backbone(torch.cat([x1, x2])))
    expected = _paper_ctr(q[:6], k[6:], 0.2) + _paper_ctr(q[6:], k[:6], 0.2)
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    assert all(not p.requires_grad for p in m.momentum_backbone.parameters())
    # momentum: cosine from 0.99 to 1 over the run, EMA of the query encoder
    before = [p.clone() for p in m.momentum_backbone.parameters()]
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(0.1)
    m.on_step_end(0, 10)
    for b, t, s in zip(before, m.momentum_backbone.parameters(), m.backbone.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)
    assert float(m.momentum) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi * 0.1)) / 2)
    m.on_step_end(9, 10)
    assert float(m.momentum) == pytest.approx(1.0)


def test_v2_enqueues_momentum_keys_fifo() -> None:
    torch.manual_seed(0)
    m = MoCo(tiny_vit(), MoCoConfig(version=2, queue_size=10, proj_hidden_dim=32, proj_dim=16))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    for step in range(3):
        old = m.queue.clone()
        m([x1, x2])
        with torch.no_grad():
            k2 = F.normalize(m.momentum_projector(m.momentum_backbone(x2)), dim=1)
        rows = [(4 * step + i) % 10 for i in range(4)]
        torch.testing.assert_close(m.queue[rows], k2)
        untouched = [r for r in range(10) if r not in rows]
        torch.testing.assert_close(m.queue[untouched], old[untouched])
    assert int(m.queue_ptr) == 2
    m.eval()
    frozen = m.queue.clone()
    m([x1, x2])
    torch.testing.assert_close(m.queue, frozen)  # evaluation never changes the queue


def test_registry_names_and_defaults() -> None:
    v2, _ = build_method("mocov2", "vit_tiny_patch16_224", img_size=32, overrides={"backbone": tiny_vit_kwargs()})
    v3, _ = build_method("mocov3", "vit_tiny_patch16_224", img_size=32, overrides={"backbone": tiny_vit_kwargs()})
    assert v2.cfg.version == 2 and v2.cfg.queue_size == 65536 and v2.cfg.temperature == 0.2 and v2.predictor is None
    assert v3.cfg.version == 3 and v3.cfg.momentum == 0.99 and v3.cfg.momentum_final == 1.0 and v3.cfg.proj_dim == 256
    assert v3.cfg.view["blur_p"] == 1.0 and v3.cfg.view2["solarize_p"] == 0.2  # BYOL's asymmetric pair
