"""DINO: head and loss parity with lightly, multi-crop views, the method's schedules and EMA."""

from __future__ import annotations

import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss
from lightly.models.modules import DINOProjectionHead
from PIL import Image

from histofm import HistofmError
from histofm.data import sample_path
from histofm.data.multicrop import MultiCropConfig, MultiCropTransform, ect_crop_box, scaled_multicrop_sizes
from histofm.layers.heads import DINOHead
from histofm.methods.losses import DINOLoss, dino_cross_entropy
from histofm.methods.registry import build_method

TINY = {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32, "backbone_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}}


# ------------------------------------------------------------------------- head
def test_head_matches_lightly_with_the_same_weights() -> None:
    ref = DINOProjectionHead(input_dim=24, hidden_dim=40, bottleneck_dim=16, output_dim=50)
    ours = DINOHead(24, out_dim=50, hidden_dim=40, bottleneck_dim=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in (0, 2, 4):  # both use Linear, GELU, Linear, GELU, Linear
            ours.mlp[i].weight.copy_(torch.randn(ours.mlp[i].weight.shape, generator=g) * 0.2)
            ours.mlp[i].bias.copy_(torch.randn(ours.mlp[i].bias.shape, generator=g) * 0.2)
            ref.layers[i].weight.copy_(ours.mlp[i].weight)
            ref.layers[i].bias.copy_(ours.mlp[i].bias)
        v = torch.randn(50, 16, generator=g)
        ours.last_layer.parametrizations.weight.original1.copy_(v)
        ref.last_layer.weight_v.copy_(v)
    x = torch.randn(7, 24)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_head_prototypes_are_unit_vectors_and_gain_is_frozen() -> None:
    head = DINOHead(16, out_dim=30, hidden_dim=20, bottleneck_dim=8)
    rows = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(rows, torch.ones(30))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    # logits are cosines between the unit bottleneck and unit prototypes
    assert head(torch.randn(5, 16)).abs().max() <= 1.0 + 1e-5
    free = DINOHead(16, out_dim=30, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_head_freeze_last_layer_blocks_only_the_prototype_gradient() -> None:
    head = DINOHead(16, out_dim=30, hidden_dim=20, bottleneck_dim=8)
    head(torch.randn(5, 16), freeze_last_layer=True).square().sum().backward()
    v = head.last_layer.parametrizations.weight.original1
    assert v.grad is not None and v.grad.abs().max() == 0
    assert head.mlp[0].weight.grad.abs().max() > 0


# ------------------------------------------------------------------------- loss
@pytest.mark.parametrize(
    "batch,n_teacher,n_student,dim,teacher_temp,student_temp",
    [(4, 2, 10, 64, 0.04, 0.1), (8, 2, 2, 32, 0.07, 0.2), (3, 2, 6, 100, 0.05, 0.1), (16, 1, 4, 256, 0.06, 0.15)],
)
def test_dino_loss_matches_lightly_across_steps(batch, n_teacher, n_student, dim, teacher_temp, student_temp) -> None:
    ref = LightlyDINOLoss(output_dim=dim, teacher_temp=teacher_temp, student_temp=student_temp, center_momentum=0.9)
    ours = DINOLoss(dim, student_temp=student_temp, center_momentum=0.9)
    g = torch.Generator().manual_seed(batch)
    for _ in range(4):  # the center evolves: later steps test the center update too
        teacher = [torch.randn(batch, dim, generator=g) * 3 + 0.5 for _ in range(n_teacher)]
        student = [torch.randn(batch, dim, generator=g).requires_grad_() for _ in range(n_student)]
        a = ref(teacher, student, teacher_temp=teacher_temp)
        b = ours(student, teacher, teacher_temp)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        for ga, gb in zip(torch.autograd.grad(a, student), torch.autograd.grad(b, student)):
            torch.testing.assert_close(gb, ga, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ours.center.view(-1), ref.center.view(-1), atol=1e-6, rtol=1e-5)
    assert ours.center.abs().sum() > 0


def test_dino_cross_entropy_skips_same_view_pairs() -> None:
    # Identical teacher and student views: the skipped diagonal would be the lowest terms.
    t = torch.softmax(torch.randn(2, 5, 10), dim=-1)
    s = torch.randn(3, 5, 10)
    full = -(t[:, None] * torch.log_softmax(s / 0.1, -1)[None]).sum(-1).mean(-1)  # (T, S)
    expected = (full.sum() - full[0, 0] - full[1, 1]) / 4
    torch.testing.assert_close(dino_cross_entropy(s, t, 0.1), expected)
    with pytest.raises(HistofmError, match="two crops"):
        dino_cross_entropy(s[:1], t[:1], 0.1)


# -------------------------------------------------------------------- multicrop
def _tile(size: int = 96) -> Image.Image:
    return Image.open(sample_path("hgsc_nest")).convert("RGB").crop((200, 200, 200 + size, 200 + size))


def test_multicrop_gives_global_then_local_normalised_crops() -> None:
    tf = MultiCropTransform(MultiCropConfig(global_size=48, local_size=24, n_local=3))
    crops = tf(_tile())
    assert [tuple(c.shape) for c in crops] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    assert -3 < float(torch.stack(crops[:2]).mean()) < 3
    assert not torch.equal(crops[0], crops[1])  # two different random views
    with pytest.raises(HistofmError, match="PIL"):
        tf(torch.zeros(3, 8, 8))
    with pytest.raises(HistofmError, match="crop"):
        MultiCropConfig(crop="zoom")


def test_scaled_sizes_follow_dinov2_and_respect_the_patch() -> None:
    assert scaled_multicrop_sizes(224, 14) == {"global_size": 224, "local_size": 98, "ect_region": 392}
    assert scaled_multicrop_sizes(224, 16)["local_size"] == 96
    small = scaled_multicrop_sizes(48, 8)
    assert small["local_size"] % 8 == 0 and small["ect_region"] == 84


def test_ect_crops_keep_magnification_unlike_resized_crops() -> None:
    # ECT boxes have about the output's side (scale 0.9-1.1 of its area), nearly square.
    for _ in range(200):
        top, left, h, w = ect_crop_box(392, 98, (0.9, 1.1), (0.95, 1.05))
        assert 0 <= top <= 392 - h and 0 <= left <= 392 - w
        assert 98 * 0.9**0.5 * 0.97 <= h <= 98 * 1.1**0.5 * 1.03 and 0.94 <= h / w <= 1.06
    # On real tissue: ECT crops keep the apparent magnification (their high-frequency
    # energy matches plain crops of the region), random-resized crops rescale (here: shrink) them.
    plain = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0, hflip=False)
    sizes = dict(global_size=96, local_size=42, n_local=8, ect_region=168)
    ect = MultiCropTransform(MultiCropConfig(crop="ect", **sizes, **plain))
    rrc = MultiCropTransform(MultiCropConfig(crop="rrc", **sizes, **plain))
    tile = _tile(168)

    def sharpness(crops):
        x = torch.stack(crops)
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    torch.manual_seed(0)
    native = MultiCropTransform(MultiCropConfig(crop="ect", ect_scale=(1.0, 1.0), ect_ratio=(1.0, 1.0), **sizes, **plain))
    ref = sharpness([c for _ in range(8) for c in native(tile)[:2]])
    ect_s = sharpness([c for _ in range(8) for c in ect(tile)[:2]])
    rrc_s = sharpness([c for _ in range(8) for c in rrc(tile)[:2]])
    assert abs(ect_s / ref - 1) < 0.1
    assert abs(rrc_s / ref - 1) > 0.2  # 96 px out of 95-168 px boxes: shrunk, so sharper
    assert [tuple(c.shape) for c in ect(tile)] == [(3, 96, 96)] * 2 + [(3, 42, 42)] * 8


# ----------------------------------------------------------------------- method
def _batch(tf, n: int = 4):
    tile = _tile()
    views = [tf(tile) for _ in range(n)]
    return [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]


def test_dino_method_trains_student_only_and_ema_moves_teacher() -> None:
    method, tf = build_method("dino", "vit_tiny_patch8_224", img_size=32, overrides={**TINY, "n_local_crops": 2})
    batch = _batch(tf)
    assert [b.shape[-1] for b in batch] == [32, 32, 24, 24]  # locals keep 3 x 3 patches
    out = method(batch)
    assert torch.isfinite(out["loss"]) and out["teacher_temp"] == pytest.approx(0.04)
    out["loss"].backward()
    trainable = method.trainable_parameters()
    assert all(p.grad is not None for n, p in method.student.named_parameters() if p.requires_grad and "mask" not in n)
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert method.backbone is method.teacher["backbone"]
    # One optimiser step on the student, then the EMA pulls the teacher towards it.
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.01)
    s = method.student["backbone"].blocks[0].mlp.fc1.weight
    t = method.teacher["backbone"].blocks[0].mlp.fc1.weight
    before = float((s - t).detach().norm())
    method.on_step_end(0, 100)
    after = float((s - t).detach().norm())
    assert after == pytest.approx(before * 0.996, rel=1e-3)
    assert method.teacher_temp() > 0.04  # the warm-up advanced


def test_dino_schedules() -> None:
    method, _ = build_method("dino", "vit_tiny_patch8_224", img_size=32, overrides={**TINY, "freeze_last_layer": 0.1})
    method.on_step_end(0, 100)
    assert method.last_layer_frozen()
    temps = []
    for step in range(1, 100):
        method.on_step_end(step, 100)
        temps.append(method.teacher_temp())
    assert temps[0] < temps[20] < temps[28] and temps[-1] == pytest.approx(0.07)
    assert not method.last_layer_frozen()
    assert method.momentum(0, 100) == pytest.approx(0.996) and method.momentum(100, 100) == pytest.approx(1.0)


def test_dino_bad_input_is_one_clear_error() -> None:
    with pytest.raises(HistofmError, match="tau|Unknown option"):
        build_method("dino", "vit_tiny_patch8_224", img_size=32, overrides={"tau": 0.1})
    method, _ = build_method("dino", "vit_tiny_patch8_224", img_size=32, overrides=TINY)
    with pytest.raises(HistofmError, match="list of crop tensors"):
        method(torch.zeros(2, 3, 32, 32))
    with pytest.raises(HistofmError, match="preset"):
        build_method("dino", "vit_tiny_patch8_224", img_size=32, overrides={"preset": "nope"})
