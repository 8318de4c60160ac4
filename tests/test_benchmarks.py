"""Benchmark scripts: analytical FLOP counts against torch's flop counter, parity checks, gpu_check.sh.

The benchmarks are not part of the suite; these tests check what their numbers rest on
(the FLOP formulas behind every "fraction of peak", the ours == timm check before timing)
and that ``benchmarks/gpu_check.sh`` hands every script arguments it accepts, so a
maintainer's GPU run does not die on a typo.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import histofm

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their sibling benchlib.py, as when run directly
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _counted(fn) -> int:
    """Matmul/conv FLOPs torch's flop counter sees; the math attention path makes its matmuls visible."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# Virchow2's structure (class + 4 registers, packed SwiGLU, LayerScale) and a plain GELU ViT, made small.
SMALL_VITS = {
    "virchow2": dict(depth=2, embed_dim=128, num_heads=4, mlp_ratio=5.25),
    "vit_tiny_patch16_224": dict(depth=2, img_size=64),
}


@pytest.mark.parametrize("name", list(SMALL_VITS))
def test_vit_forward_flops_match_flop_counter(name: str) -> None:
    vt = _load("vit_vs_timm")
    model = histofm.create_model(name, **SMALL_VITS[name]).eval()
    img = model.patch_embed.img_size[0]
    x = torch.randn(3, 3, img, img)
    with torch.no_grad():
        counted = _counted(lambda: model(x))
    assert vt.vit_flops(model, 3, img) == counted
    # the register tokens are part of the count: without them it would be smaller
    assert model.num_reg_tokens == (4 if name == "virchow2" else 0)


def test_vit_train_flops_match_flop_counter() -> None:
    ss = _load("ssl_step")
    model = histofm.create_model("virchow2", **SMALL_VITS["virchow2"]).train()
    x = torch.randn(2, 3, 224, 224)
    counted = _counted(lambda: model.forward_features(x).sum().backward())
    assert ss.vit_train_flops(model, 2, 224) == counted


def test_dinov2_step_flops_match_flop_counter() -> None:
    ss = _load("ssl_step")
    from histofm.methods.registry import build_method

    method, _ = build_method(
        "dinov2", "vit_small_patch14_dinov2", img_size=56,
        overrides={
            "backbone": {"depth": 2, "embed_dim": 64, "num_heads": 2}, "drop_path_rate": 0.0, "n_local_crops": 2,
            "out_dim": 512, "patch_out_dim": 512, "hidden_dim": 128, "bottleneck_dim": 32, "centering": "centering",
        },
    )
    method.train()
    g = torch.Generator().manual_seed(0)
    B = 4
    crops = [torch.randn(B, 3, 56, 56, generator=g) for _ in range(2)] + [torch.randn(B, 3, 28, 28, generator=g) for _ in range(2)]
    masks = torch.rand(2 * B, 4, 4, generator=g) < 0.3  # (2B, 4, 4)
    counted = _counted(lambda: method({"crops": crops, "masks": masks})["loss"].backward())
    bb = method.student["backbone"]
    expected = ss.dinov2_step_flops(
        bb, batch=B, n_global=2, n_local=2, global_px=56, local_px=28, n_masked=int(masks.sum()),
        head=ss.head_macs(64, 128, 32, 512),
    )
    # what the formula leaves out (KoLeo's pairwise distances, the loss reductions) is tiny
    assert expected == pytest.approx(counted, rel=0.01)
    assert expected < counted  # ... and only ever missing, never extra


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2"])
def test_dinov2_arch_table_builds_timms_network(arch: str) -> None:
    ss = _load("ssl_step")
    ours_arch, kwargs, timm_arch = ss.DINOV2_ARCHS[arch]
    with torch.device("meta"):
        ours = histofm.create_model(ours_arch, img_size=224, init_values=1e-5, **kwargs)
        ref = timm.create_model(timm_arch, img_size=224, init_values=1e-5, num_classes=0)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours.patch_size == 14


def test_virchow2_pair_is_the_card_config_and_agrees() -> None:
    vt = _load("vit_vs_timm")
    ours, ref, embed = vt.build_pair("virchow2", depth=1)
    mlp = ref.blocks[0].mlp  # timm's SwiGLUPacked: GluMlp, SiLU on the first half
    assert isinstance(mlp, timm.layers.GluMlp) and not mlp.gate_last and isinstance(mlp.act, torch.nn.SiLU)
    assert (mlp.fc1.out_features, mlp.fc2.in_features) == (6832, 3416)
    assert ref.num_prefix_tokens == 5 and ref.blocks[0].ls1.gamma[0].item() == pytest.approx(0.1)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), embed(ref, x)
    assert a.shape == b.shape == (2, 2560)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vit_vs_timm_runs_and_refuses_disagreeing_models(monkeypatch, capsys) -> None:
    vt = _load("vit_vs_timm")
    args = ["--models", "vit_tiny_patch16_224", "--batch", "1", "--warmup", "0", "--repeats", "1", "--no-peak"]
    assert vt.main(args) == 0
    assert "ratio ours/timm" in capsys.readouterr().out

    real = vt.build_pair

    def broken(name: str, **kw):
        ours, ref, embed = real(name, **kw)
        with torch.no_grad():
            ours.blocks[-1].mlp.fc2.bias[0] += 0.5  # one channel: a constant shift would vanish in the final norm
        return ours, ref, embed

    monkeypatch.setattr(vt, "build_pair", broken)
    with pytest.raises(SystemExit, match="disagree"):
        vt.main(args)


def test_parse_only_rejects_unknown_models_and_archs() -> None:
    vt, ss = _load("vit_vs_timm"), _load("ssl_step")
    with pytest.raises(SystemExit) as e:
        vt.main(["--models", "vit_large_patch16_224,not_a_vit", "--parse-only"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        ss.main(["--arch", "vit_huge_patch14_dinov2", "--parse-only"])
    assert e.value.code == 2
    assert vt.main(["--models", "vit_large_patch16_224,virchow2", "--device", "cuda", "--compile", "--parse-only"]) == 0


def _gpu_check(tmp_path: Path, **env: str) -> tuple[int, str]:
    log = tmp_path / "sub" / "gpu_check.log"
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(log)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, **env}, timeout=300,
    )
    return proc.returncode, log.read_text()


def test_gpu_check_syntax_and_every_command_parses(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
    rc, log = _gpu_check(tmp_path)
    commands = [line for line in log.splitlines() if line.startswith("+ ")]
    assert rc == 0, log
    assert len(commands) >= 4 and all("--device cuda" in c for c in commands)
    assert log.count("arguments ok") == len(commands)
    assert any("virchow2" in c and "--compile" in c for c in commands)
    assert any("vit_large_patch14_dinov2" in c for c in commands)
    assert log.rstrip().endswith("gpu_check ok")


def test_gpu_check_fails_when_a_command_fails(tmp_path: Path) -> None:
    rc, log = _gpu_check(tmp_path, PYTHON="false")
    assert rc != 0
    assert "gpu_check FAILED" in log
