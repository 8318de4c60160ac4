"""Inference throughput of histofm's ViT against timm's, same weights and config, in one run.

    python benchmarks/vit_vs_timm.py                       # CPU fp32, ViT-S/16 and ViT-B/16, batch 32
    python benchmarks/vit_vs_timm.py --threads 1 --cpu-time --models vit_large_patch16_224,virchow2 --batch 2
    python benchmarks/vit_vs_timm.py --device cuda --models vit_large_patch16_224,virchow2 --batch 128
    python benchmarks/vit_vs_timm.py --device cuda --models virchow2 --compile   # torch.compile both sides

``--models`` takes timm architecture names that histofm also registers
(``vit_large_patch16_224`` is the issue's ViT-L/16 row) and the zoo configs in
``ZOO_PEERS``: ``virchow2`` is the issue's ViT-H/14 row (1280 wide, 32 blocks, 16
heads, patch 14, class token + 4 registers, packed SwiGLU with SiLU gate,
``mlp_ratio`` 5.3375 so ``fc1`` is 1280 -> 6832 and ``fc2`` 3416 -> 1280, LayerScale
1e-5, 224 px); its timm peer is ``timm.create_model("vit_huge_patch14_224", ...)``
with the kwargs of Virchow2's hub ``config.json`` and the model card's embedding
(class token ++ mean of the patch tokens, registers excluded: 2560-d). Ours is
``histofm.create_model(name)`` and loads the timm state dict with ``strict=True``;
LayerScale gains are set to 0.1 first (at 1e-5 every block would be nearly the
identity) and the outputs of both in fp32 must agree before anything is timed.

Timing: each repeat runs ``--iters`` forwards of ours and then of timm's (the order
alternates between repeats) under ``torch.inference_mode``, after ``--warmup``
rounds (which include compilation with ``--compile``); the numbers are medians
over repeats. The ratio is ours / timm in images per second (> 1: ours faster).
CUDA runs under bf16 autocast; CPU runs in fp32 (``--bf16`` for autocast there).

Fraction of peak: in the same run the script times a large square matmul in the
compute dtype (bf16 on CUDA, ``--peak-n`` 8192; fp32 on CPU, 4096), with the same
clock, and reports achieved FLOP/s of each model divided by it. FLOPs are counted
analytically, matmuls only, 2 per multiply-add, per image::

    F = 2 P (3 p^2) D                                   patch embedding (conv as matmul)
      + L [ 2 N D (3D)                                  qkv
          + 2 (2 N^2 D)                                 q k^T and attn @ v, all heads
          + 2 N D D                                     output projection
          + 2 N D H1 + 2 N H2 D ]                       MLP: fc1 D -> H1, fc2 H2 -> D

with ``P = (S/p)^2`` patches of an ``S`` px image, ``N = P + 1 + R`` tokens (class
and ``R`` register tokens take part in every block), ``L`` blocks, width ``D``. A GELU
MLP has ``H1 = H2 = 4D``; the packed SwiGLU has ``H1 = 2h`` (both halves in one
``fc1``) and ``H2 = h`` (the gated product), h = 3416 for Virchow2. Softmax,
norms, activations and the pooling are not counted. Per image: ViT-L/16 at 224 px
(P = 196, N = 197) 123.1 GFLOP; Virchow2 ViT-H/14 (P = 256, N = 261) 340.1 GFLOP.
Tested against ``torch.utils.flop_counter`` in ``tests/test_benchmarks.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from benchlib import setup_run, time_alternating, vit_flops
from torch import nn

#: zoo name -> (timm architecture, timm kwargs of the hub config.json, index of the first patch token
#: for the card's "class token ++ patch mean" embedding, or None when the embedding is the class token)
ZOO_PEERS: dict[str, tuple[str, dict[str, Any], int | None]] = {
    "virchow2": (
        "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, global_pool="", dynamic_img_size=True,
             mlp_layer="SwiGLUPacked", act_layer="SiLU"),
        5,
    ),
    "virchow": (
        "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
             mlp_layer="SwiGLUPacked", act_layer="SiLU"),
        1,
    ),
}


def build_pair(
    name: str, **overrides: Any
) -> tuple[nn.Module, nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """(ours, timm's, timm's embedding function) for ``name``, ours holding timm's weights (strict load).

    ``overrides`` (for example ``depth=1`` in tests) go to both constructors.
    """
    import timm

    import histofm

    if name in ZOO_PEERS:
        arch, kwargs, first_patch = ZOO_PEERS[name]
        kwargs = dict(kwargs)
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
        kwargs["act_layer"] = getattr(nn, kwargs["act_layer"])
        ref = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs, **overrides)
    else:
        first_patch = None
        ref = timm.create_model(name, pretrained=False, num_classes=0, **overrides)
    with torch.no_grad():  # LayerScale at 1e-5 would make every block ~identity: the check would test little
        for pname, p in ref.named_parameters():
            if pname.endswith(".gamma"):
                p.fill_(0.1)
    ours = histofm.create_model(name, **overrides)
    ours.load_state_dict(ref.state_dict(), strict=True)

    def card_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if first_patch is None:
            return model(x)
        tokens = model.forward_features(x)  # (B, 1 + R + P, D)
        return torch.cat([tokens[:, 0], tokens[:, first_patch:].mean(1)], dim=-1)  # (B, 2D)

    return ours.eval(), ref.eval(), card_embedding


@contextlib.contextmanager
def _full_fp32() -> Any:
    """No TF32 in matmuls and convolutions while checking parity on a GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def bench_one(name: str, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict[str, float]:
    """Check ours == timm's in fp32, then time both (see the module docstring)."""
    ours, ref, ref_embed = build_pair(name)
    ours, ref = ours.to(device), ref.to(device)
    img = ours.patch_embed.img_size[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, img, img, generator=g).to(device)
    with torch.inference_mode(), _full_fp32():  # fp32 parity on two images before anything is timed
        a, b = ours(x[:2]).float(), ref_embed(ref, x[:2]).float()
        diff = (a - b).abs().max().item()
        scale = b.abs().max().item()
    if a.shape != b.shape or not diff <= 1e-4 * max(scale, 1.0):
        raise SystemExit(f"{name}: ours and timm disagree (shapes {tuple(a.shape)} / {tuple(b.shape)}, max |diff| {diff:.2e})")

    if args.channels_last:
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run_ours: Callable[[torch.Tensor], torch.Tensor] = ours
    run_ref: Callable[[torch.Tensor], torch.Tensor] = lambda t: ref_embed(ref, t)  # noqa: E731
    if args.compile:
        run_ours = torch.compile(ours, mode=args.compile_mode)
        run_ref = torch.compile(run_ref, mode=args.compile_mode)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if device.type == "cuda" or args.bf16
        else contextlib.nullcontext()
    )
    clock = time.process_time if args.cpu_time else time.perf_counter
    with torch.inference_mode(), autocast:
        fns = {"ours": lambda: run_ours(x), "timm": lambda: run_ref(x)}
        secs = time_alternating(fns, device, args.warmup, args.repeats, clock, args.iters)
    flops = vit_flops(ours, args.batch, img)
    res = {
        "ours_img_s": args.batch / secs["ours"],
        "timm_img_s": args.batch / secs["timm"],
        "ratio": secs["timm"] / secs["ours"],
        "max_abs_diff": diff,
        "gflop_per_img": flops / args.batch / 1e9,
    }
    if peak is not None:
        res["ours_peak_frac"] = flops / secs["ours"] / peak
        res["timm_peak_frac"] = flops / secs["timm"] / peak
    return res


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line; ``--parse-only`` stops after validating it (used by tests and gpu_check.sh)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224",
                   help="comma-separated: timm ViT names histofm registers, or " + ", ".join(ZOO_PEERS))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (compilation happens here with --compile)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=1, help="forwards per timed repeat (use more on a GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile ours and timm's, same mode")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for both (default, max-autotune, ...)")
    p.add_argument("--channels-last", action="store_true", help="channels-last input and patch-embedding weights")
    p.add_argument("--peak-n", type=int, default=0, help="side of the peak matmul (default: 8192 on CUDA, 4096 on CPU)")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak and the peak fractions")
    p.add_argument(
        "--cpu-time", action="store_true",
        help="time with process CPU time instead of wall clock (CPU only; for a busy shared machine, use --threads 1)",
    )
    p.add_argument("--parse-only", action="store_true", help="validate the arguments and exit")
    args = p.parse_args(argv)
    if args.cpu_time and args.device != "cpu":
        p.error("--cpu-time only makes sense with --device cpu")
    if min(args.batch, args.repeats, args.iters) < 1 or args.warmup < 0:
        p.error("--batch, --repeats and --iters must be >= 1 and --warmup >= 0")
    import histofm

    known = set(histofm.list_models("vit_*")) | set(ZOO_PEERS)
    unknown = [m for m in args.models.split(",") if m.strip() not in known]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return p, args


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    if args.parse_only:
        print(f"arguments ok: {vars(args)}")
        return 0
    device, clock, dtype, peak = setup_run(p, args)
    header = f"device={device}"
    if device.type == "cuda":
        header += f" ({torch.cuda.get_device_name(device)}), bf16 autocast"
    else:
        header += f", {torch.get_num_threads()} threads, {'bf16 autocast' if args.bf16 else 'fp32'}"
        header += ", process CPU time" if args.cpu_time else ", wall clock"
    if peak is not None:
        header += f", measured {str(dtype).removeprefix('torch.')} matmul peak {peak / 1e12:.3f} TFLOP/s"
    header += f", {'torch.compile mode=' + args.compile_mode if args.compile else 'eager'}"
    header += ", channels-last" if args.channels_last else ""
    print(f"{header}; batch {args.batch}, warm-up {args.warmup}, median of {args.repeats} x {args.iters}; torch {torch.__version__}")
    for name in args.models.split(","):
        r = bench_one(name.strip(), args, device, peak)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the pair's models are gone; keep the next row's peak memory its own
        line = (
            f"{name:24s} {r['gflop_per_img']:6.1f} GFLOP/img   ours {r['ours_img_s']:8.2f} img/s   "
            f"timm {r['timm_img_s']:8.2f} img/s   ratio ours/timm {r['ratio']:.3f}x   (fp32 max |diff| {r['max_abs_diff']:.1e})"
        )
        if peak is not None:
            line += f"   peak fraction ours {r['ours_peak_frac']:.1%} timm {r['timm_peak_frac']:.1%}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
