"""iBOT: patch-loss parity with lightly, masked student tokens, shared and separate heads."""

from __future__ import annotations

import random

import pytest
import torch
from lightly.loss import IBOTPatchLoss as LightlyIBOTPatchLoss
from PIL import Image

from histofm.data import sample_path
from histofm.methods.losses import IBOTPatchLoss, ibot_cross_entropy
from histofm.methods.masking import BlockMaskCollator
from histofm.methods.registry import build_method

TINY = {"out_dim": 96, "patch_out_dim": 80, "hidden_dim": 64, "bottleneck_dim": 32, "n_local_crops": 2,
        "backbone_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}}


@pytest.mark.parametrize(
    "batch,grid,dim,teacher_temp,student_temp", [(4, 4, 64, 0.04, 0.1), (6, 7, 32, 0.07, 0.2), (10, 14, 128, 0.05, 0.1)]
)
def test_patch_loss_matches_lightly_across_steps(batch, grid, dim, teacher_temp, student_temp) -> None:
    ref = LightlyIBOTPatchLoss(output_dim=dim, teacher_temp=teacher_temp, student_temp=student_temp, center_momentum=0.9)
    ours = IBOTPatchLoss(dim, student_temp=student_temp, center_momentum=0.9)
    collate = BlockMaskCollator((grid, grid))
    rng = random.Random(batch)
    g = torch.Generator().manual_seed(grid)
    for _ in range(4):
        masks = collate(batch, rng)  # (B, grid, grid), half the images unmasked
        m = int(masks.sum())
        teacher = torch.randn(m, dim, generator=g) * 2
        student = torch.randn(m, dim, generator=g).requires_grad_()
        a = ref(teacher, student, masks, teacher_temp=teacher_temp)
        b = ours(student, teacher, masks, teacher_temp)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(b, student)[0], torch.autograd.grad(a, student)[0], atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(ours.center, ref.center.value, atol=1e-6, rtol=1e-5)


def test_patch_loss_weights_each_image_equally() -> None:
    # Image 0 has 1 masked patch, image 1 has 3, image 2 none: per-image means, divided by B = 3.
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1, 0] = True
    masks[1, 1, 0] = True
    q = torch.softmax(torch.randn(4, 6), -1)
    s = torch.randn(4, 6)
    ce = -(q * torch.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (ce[0] + ce[1:].mean()) / 3
    torch.testing.assert_close(ibot_cross_entropy(s, q, masks, 0.1), expected)


def test_empty_masks_give_zero_loss_and_keep_the_center() -> None:
    loss = IBOTPatchLoss(8)
    out = loss(torch.zeros(0, 8), torch.zeros(0, 8), torch.zeros(2, 3, 3, dtype=torch.bool), 0.04)
    assert float(out) == 0.0 and torch.equal(loss.center, torch.zeros(1, 8))


def _batch(tf, n: int = 4):
    tile = Image.open(sample_path("hgsc_stroma")).convert("RGB").crop((0, 0, 96, 96))
    views = [tf(tile) for _ in range(n)]
    return [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]


@pytest.mark.parametrize("shared", [True, False])
def test_ibot_method_masks_student_tokens_and_trains(shared) -> None:
    method, tf = build_method("ibot", "vit_tiny_patch8_224", img_size=32, overrides={**TINY, "shared_head": shared})
    assert ("patch_head" in method.student) is not shared
    batch = _batch(tf)
    masks = torch.zeros(8, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[5, 1:, 1:] = True
    out = method({"crops": batch, "masks": masks})
    assert torch.isfinite(out["loss"]) and float(out["ibot_loss"]) > 0
    assert float(out["mask_ratio"]) == pytest.approx(13 / 128)
    out["loss"].backward()
    bb = method.student["backbone"]
    assert bb.mask_token.grad is not None and bb.mask_token.grad.abs().sum() > 0
    if not shared:
        assert method.student["patch_head"].mlp[0].weight.grad.abs().sum() > 0
    # Generated masks (no "masks" in the batch): DINOv2's rule on the 2 * B global crops.
    out = method(batch)
    assert float(out["mask_ratio"]) > 0


def test_ibot_masked_student_sees_mask_tokens_teacher_does_not() -> None:
    method, tf = build_method("ibot", "vit_tiny_patch8_224", img_size=32, overrides=TINY)
    method.eval()
    x = _batch(tf)[0]
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[:, :5] = True
    bb = method.student["backbone"]
    with torch.no_grad():
        bb.mask_token.fill_(3.0)
        a, b = bb.forward_features(x), bb.forward_features(x, masks)
    assert not torch.allclose(a, b)
