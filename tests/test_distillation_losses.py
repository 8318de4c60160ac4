"""DINO, iBOT, DINOv2, Virchow2, PLUTO: each step is the sum of its named losses, and each method file reads alone.

The oracle of every term is lightly (DINOLoss, IBOTPatchLoss, KoLeoLoss, SwAV's Sinkhorn) or a
direct formula, applied to the head outputs and class tokens captured from one real step.
"""

from __future__ import annotations

import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss as LightlyDINOLoss
from lightly.loss import IBOTPatchLoss as LightlyIBOTPatchLoss
from lightly.loss import KoLeoLoss as LightlyKoLeoLoss
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

import histofm.methods
from histofm import HistofmError
from histofm.methods.base import SSLMethod
from histofm.methods.losses import TeacherCentering, teacher_temperature
from histofm.methods.masking import BlockMaskCollator
from histofm.methods.registry import build_method

G, L, B, K, KP = 2, 2, 4, 64, 48
BACKBONE = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
HEADS = {"out_dim": K, "hidden_dim": 32, "bottleneck_dim": 16, "n_local_crops": L, "drop_path_rate": 0.0,
         "backbone_kwargs": BACKBONE}
MASKED = {**HEADS, "patch_out_dim": KP}


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(G)] + [torch.randn(B, 3, 16, 16, generator=g)
                                                                          for _ in range(L)]
    masks = BlockMaskCollator((4, 4), 0.5, (0.1, 0.5), min_num_patches=1)(G * B, random.Random(seed))
    return {"crops": crops, "masks": masks}


def _capture(method: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Outputs of every head and of the student backbone's final norm, in call order."""
    calls: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        return lambda mod, args, out: calls.setdefault(name, []).append(out.detach())

    for branch in ("student", "teacher"):
        for head in ("head", "patch_head"):
            if head in getattr(method, branch):
                getattr(method, branch)[head].register_forward_hook(keep(f"{branch}.{head}"))
    method.student["backbone"].norm.register_forward_hook(keep("student.norm"))
    return calls


def _pairs_ce(teacher_probs: torch.Tensor, student_logits: torch.Tensor, tau_s: float) -> torch.Tensor:
    """Direct DINO cross-entropy: mean over (teacher view i, student view j != i) of the batch mean."""
    log_p = F.log_softmax(student_logits / tau_s, dim=-1)  # (V, B, K)
    terms = [-(teacher_probs[i] * log_p[j]).sum(-1).mean() for i in range(len(teacher_probs))
             for j in range(len(log_p)) if i != j]
    return torch.stack(terms).mean()


def _masked_ce(teacher_probs: torch.Tensor, student_logits: torch.Tensor, masks: torch.Tensor, tau_s: float):
    """Direct iBOT cross-entropy: per-image mean over masked patches, then mean over all images."""
    ce = -(teacher_probs * F.log_softmax(student_logits / tau_s, dim=-1)).sum(-1)  # (M,)
    per_image, start = [], 0
    for m in masks.reshape(len(masks), -1).sum(1).tolist():
        per_image.append(ce[start : start + m].mean() if m else ce.new_zeros(()))
        start += m
    return torch.stack(per_image).mean()


def _kde(x: torch.Tensor, kappa: float) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    n = len(x)
    k = torch.exp(kappa * x @ x.T) * (1 - torch.eye(n))
    return torch.log(k.sum(1) / (n - 1)).mean()


CASES = {
    "dino": ("dino", HEADS),
    "ibot_shared_head": ("ibot", {**MASKED, "shared_head": True}),
    "ibot_two_heads": ("ibot", {**MASKED, "shared_head": False}),
    "dinov2_sinkhorn_koleo": ("dinov2", {**MASKED, "layerscale": None}),
    "dinov2_center_shared": ("dinov2", {**MASKED, "centering": "centering", "shared_head": True,
                                        "regularizer": "none"}),
    "virchow2_kde": ("virchow2", {**MASKED, "crop": "rrc"}),
    "pluto": ("pluto", {**MASKED, "patch_sizes": (8,), "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2,
                        "decoder_patch": 8}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_loss_is_the_sum_of_its_named_losses_by_independent_oracles(case: str) -> None:
    name, overrides = CASES[case]
    torch.manual_seed(0)
    arch = "pluto" if name == "pluto" else "vit_tiny_patch16_224"
    method, _ = build_method(name, arch, img_size=32, overrides=dict(overrides))
    cfg = method.cfg
    calls = _capture(method)
    batch = _batch()
    out = method(batch)
    temp, tau_s = float(out["teacher_temp"]), cfg.student_temp
    masks = batch["masks"]
    n_cls_t, n_cls_s, M = G * B, (G + L) * B, int(masks.sum())

    # Head outputs: a shared head ran once on [class tokens; masked patch tokens].
    t_head, s_head = calls["teacher.head"][0], calls["student.head"][0]
    t_cls, s_cls = t_head[:n_cls_t], s_head[:n_cls_s]
    if name != "dino":
        if "student.patch_head" in calls:
            t_patch, s_patch = calls["teacher.patch_head"][0], calls["student.patch_head"][0]
        else:
            t_patch, s_patch = t_head[n_cls_t:], s_head[n_cls_s:]
        assert t_patch.shape[0] == s_patch.shape[0] == M

    # Class-token term.
    sinkhorn = getattr(cfg, "centering", "centering") == "sinkhorn"
    if sinkhorn:
        probs = lightly_sinkhorn(t_cls, iterations=cfg.sinkhorn_iterations, epsilon=temp).view(G, B, -1)
        dino = _pairs_ce(probs, s_cls.view(G + L, B, -1), tau_s)
    else:
        ref = LightlyDINOLoss(output_dim=K, teacher_temp=temp, student_temp=tau_s, center_momentum=0.9)
        dino = ref(list(t_cls.view(G, B, -1)), list(s_cls.view(G + L, B, -1)), teacher_temp=temp)
    torch.testing.assert_close(out["dino_loss"], dino, atol=1e-5, rtol=1e-5)
    expected = dino

    # Masked patch-token term.
    if name != "dino":
        if sinkhorn:
            ibot = _masked_ce(lightly_sinkhorn(t_patch, iterations=cfg.sinkhorn_iterations, epsilon=temp),
                              s_patch, masks, tau_s)
        else:
            ref_p = LightlyIBOTPatchLoss(output_dim=t_patch.shape[1], teacher_temp=temp, student_temp=tau_s,
                                         center_momentum=0.9)
            ibot = ref_p(t_patch, s_patch, masks, teacher_temp=temp)
        torch.testing.assert_close(out["ibot_loss"], ibot, atol=1e-5, rtol=1e-5)
        expected = expected + cfg.patch_loss_weight * ibot

    # Regulariser on the student's class tokens of each (masked) global crop.
    reg_name = getattr(cfg, "regularizer", "none")
    if reg_name != "none":
        cls_tokens = calls["student.norm"][0][:, 0]  # (G*B, D): the first student pass is the global crops
        if reg_name == "koleo":
            reg = sum(LightlyKoLeoLoss()(x) for x in cls_tokens.chunk(G))
        else:
            reg = sum(_kde(x, cfg.kde_kappa) for x in cls_tokens.chunk(G))
        # rtol 1e-4: at initialisation the class tokens nearly coincide and -log(distance) is ill-conditioned.
        torch.testing.assert_close(out[f"aux_{reg_name}"], reg, atol=1e-5, rtol=1e-4)
        expected = expected + cfg.reg_weight * reg

    if name == "pluto":  # PLUTO's own terms (tested in tests/test_pluto.py) on top of DINOv2's
        expected = expected + cfg.mae_weight * out["mae_loss"] + cfg.fourier_weight * out["fourier_loss"]
    torch.testing.assert_close(out["loss"].detach(), expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- a method file reads alone
_ROOT = os.path.dirname(histofm.methods.__file__)
# What each method's step may run code in, among methods/ and layers/heads.py (backbone and utils aside).
_ALLOWED = {
    "dino": {"dino.py", "losses.py", "heads.py"},
    "ibot": {"ibot.py", "losses.py", "masking.py", "heads.py"},
    "dinov2": {"dinov2.py", "losses.py", "masking.py", "heads.py"},
}
_FAMILY = {"dino.py", "ibot.py", "dinov2.py", "distillation.py"}


def _files_run(fn) -> set[str]:
    seen: set[str] = set()

    def hook(frame, event, arg) -> None:
        path = frame.f_code.co_filename
        if event == "call" and (path.startswith(_ROOT) or path.endswith(os.path.join("layers", "heads.py"))):
            seen.add(os.path.basename(path))

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


@pytest.mark.parametrize("name", ["dino", "ibot", "dinov2", "pluto"])
def test_a_step_runs_only_its_own_file_the_losses_heads_and_masking(name: str) -> None:
    torch.manual_seed(0)
    if name == "pluto":
        method, _ = build_method(name, "pluto", img_size=32, overrides=dict(CASES["pluto"][1]))
    else:
        overrides = HEADS if name == "dino" else MASKED
        method, _ = build_method(name, "vit_tiny_patch16_224", img_size=32, overrides=dict(overrides))
    assert type(method).__bases__ == (SSLMethod,)  # composed, not inherited from another method
    batch = _batch()["crops"]  # masks drawn by the method

    def step() -> None:
        method(batch)["loss"].backward()
        method.on_step_end(0, 10)

    files = _files_run(step)
    if name == "pluto":  # its own file, the same named losses, and the MAE helpers; nothing of the others
        assert {"pluto.py", "losses.py", "masking.py", "heads.py"} <= files and not files & _FAMILY, files
    else:
        assert files <= _ALLOWED[name] | {"base.py"} and _ALLOWED[name] - {"base.py"} <= files, files


def test_training_checkpoints_keep_their_names() -> None:
    # The state a run saves: old checkpoints resume only if these names stay.
    torch.manual_seed(0)
    method, _ = build_method("dinov2", "vit_tiny_patch16_224", img_size=32, overrides=dict(MASKED))
    tops = {k.split(".")[0] + "." + k.split(".")[1] if "." in k else k for k in method.state_dict()}
    assert tops == {"student.backbone", "student.head", "student.patch_head", "teacher.backbone", "teacher.head",
                    "teacher.patch_head", "dino_loss.center", "ibot_loss.center", "step", "max_steps"}
    assert set(method.backbone.state_dict()) == set(method.student["backbone"].state_dict())


# ---------------------------------------------------------------- small parts
def test_teacher_temperature_warms_up_linearly_then_stays() -> None:
    assert teacher_temperature(0, 0, 0.04, 0.07, 0.3) == 0.04  # before the run length is known
    assert teacher_temperature(0, 0, 0.04, 0.07, 0.0) == 0.07
    assert math.isclose(teacher_temperature(15, 100, 0.04, 0.07, 0.3), 0.055)
    assert teacher_temperature(30, 100, 0.04, 0.07, 0.3) == teacher_temperature(99, 100, 0.04, 0.07, 0.3) == 0.07


def test_centering_modes() -> None:
    with pytest.raises(HistofmError, match="centering"):
        TeacherCentering(8, centering="mean")
    logits = torch.randn(6, 8)
    sk = TeacherCentering(8, centering="sinkhorn")
    torch.testing.assert_close(sk.teacher_probs(logits, 0.05), lightly_sinkhorn(logits, iterations=3, epsilon=0.05))
    sk.update_center(logits)
    assert torch.equal(sk.center, torch.zeros(1, 8))  # Sinkhorn keeps no running center
    assert sk.teacher_probs(torch.zeros(0, 8), 0.05).shape == (0, 8)  # nothing masked
    rm = TeacherCentering(8, center_momentum=0.9)
    rm.update_center(logits)
    torch.testing.assert_close(rm.center, 0.1 * logits.mean(0, keepdim=True))
