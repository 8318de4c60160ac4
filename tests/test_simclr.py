"""SimCLR: NT-Xent parity with lightly, the factor 2 of the TF code, learning on the nucleus task: tests/test_learning.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss as LightlyNTXent
from PIL import Image

from histofm import HistofmError
from histofm.data import sample_path
from histofm.methods.registry import build_method
from histofm.methods.simclr import NTXentLoss, nt_xent
from ssl_check import tiny_vit_kwargs


@pytest.mark.parametrize("batch", [2, 8, 33])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_nt_xent_matches_lightly(batch: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(batch)
    a = torch.randn(batch, 16, generator=g, requires_grad=True)
    b = torch.randn(batch, 16, generator=g, requires_grad=True)
    ours = NTXentLoss(temperature)(a, b)
    (ga, gb) = torch.autograd.grad(ours, (a, b))
    ref = LightlyNTXent(temperature=temperature)(a, b)
    (ra, rb) = torch.autograd.grad(ref, (a, b))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-6)


def test_loss_is_half_of_the_original_tf_code() -> None:
    # The TF code: logits_ab, logits_aa (self masked); loss_a + loss_b, each a mean over the batch.
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    t, n, big = 0.2, 6, 1e9
    mask = torch.eye(n) * big
    ab, aa = a @ b.T / t, a @ a.T / t - mask
    ba, bb = b @ a.T / t, b @ b.T / t - mask
    labels = torch.arange(n)
    tf = F.cross_entropy(torch.cat([ab, aa], 1), labels) + F.cross_entropy(torch.cat([ba, bb], 1), labels)
    torch.testing.assert_close(nt_xent(a, b, t), tf / 2)


def test_perfect_pairs_give_low_loss() -> None:
    z = F.normalize(torch.randn(16, 32), dim=1)
    assert nt_xent(z, z, 0.1) < 0.1 < nt_xent(z, torch.roll(z, 1, 0), 0.1)


def test_build_runs_per_sample_views_and_every_parameter_learns() -> None:
    method, transform = build_method(
        "simclr", "vit_tiny_patch16_224", img_size=32,
        overrides={"backbone": tiny_vit_kwargs(), "proj_hidden_dim": 32, "proj_dim": 16},
    )
    with Image.open(sample_path("hgsc_nest")) as im:
        tiles = [im.convert("RGB").crop((i * 64, 0, i * 64 + 64, 64)) for i in range(4)]
    samples = [transform(t) for t in tiles]
    assert len(samples[0]) == 2 and samples[0][0].shape == (3, 32, 32)
    batch = torch.utils.data.default_collate(samples)
    out = method(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    with pytest.raises(HistofmError, match="Unknown option"):
        build_method("simclr", "vit_tiny_patch16_224", img_size=32, overrides={"temprature": 0.1})
    with pytest.raises(HistofmError, match="two views"):
        method([batch[0]])
