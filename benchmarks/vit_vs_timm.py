"""Forward throughput of histofm's ViT against timm's, same weights and config, in one run.

    python benchmarks/vit_vs_timm.py                       # CPU fp32, ViT-S/16 and ViT-B/16, batch 32
    python benchmarks/vit_vs_timm.py --repeats 3 --threads 2
    python benchmarks/vit_vs_timm.py --device cuda         # bf16 autocast + fraction of matmul peak

Both models are built from the same timm state dict (ours loads it with
``strict=True``) and their outputs are checked to agree before timing. Each
repeat times one forward of ours and one of timm's, alternating which goes
first, under ``torch.inference_mode``; the reported numbers are medians over
repeats, after warm-up. The ratio is ours / timm in images per second (> 1:
ours is faster).

On CUDA the script also measures the achieved bf16 matmul peak of the GPU with
a large square matmul in the same run, and reports the fraction of it that each
ViT forward reaches, counting FLOPs analytically (matmuls only: patch
embedding, qkv, attention scores and weighted sum, projection, MLP).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def vit_forward_flops(model: nn.Module, batch: int, img_size: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward of a timm-style ViT."""
    D = model.embed_dim
    p = model.patch_size
    n_patches = (img_size // p) ** 2
    N = n_patches + model.num_prefix_tokens
    flops = 2 * n_patches * (3 * p * p) * D  # patch embedding
    for blk in model.blocks:
        hidden = blk.mlp.fc1.out_features
        fc2_in = blk.mlp.fc2.in_features
        flops += 2 * N * D * 3 * D  # qkv
        flops += 2 * 2 * N * N * D  # q k^T and attn v
        flops += 2 * N * D * D  # output projection
        flops += 2 * N * D * hidden + 2 * N * fc2_in * D  # MLP
    return float(flops * batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured FLOP/s of a large ``n x n`` matmul (the practical peak of this device)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def time_pair(
    fns: dict[str, Callable[[], torch.Tensor]],
    device: torch.device,
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each function, alternating their order every repeat."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            _sync(device)
            t = clock()
            fns[name]()
            _sync(device)
            times[name].append(clock() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_one(name: str, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict[str, float]:
    import timm

    import histofm

    ref = timm.create_model(name, pretrained=False, num_classes=0).eval()
    ours = histofm.create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = ref.to(device), ours.to(device)
    img = ours.patch_embed.img_size[0]
    x = torch.randn(args.batch, 3, img, img, device=device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if device.type == "cuda" or args.bf16
        else contextlib.nullcontext()
    )

    with torch.inference_mode(), autocast:
        diff = (ours(x[:2]).float() - ref(x[:2]).float()).abs().max().item()
        clock = time.process_time if args.cpu_time else time.perf_counter
        fns = {"ours": lambda: ours(x), "timm": lambda: ref(x)}
        secs = time_pair(fns, device, args.warmup, args.repeats, clock)
    res = {
        "ours_img_s": args.batch / secs["ours"],
        "timm_img_s": args.batch / secs["timm"],
        "ratio": secs["timm"] / secs["ours"],
        "max_abs_diff": diff,
    }
    if peak is not None:
        flops = vit_forward_flops(ours, args.batch, img)
        res["ours_peak_frac"] = flops / secs["ours"] / peak
        res["timm_peak_frac"] = flops / secs["timm"] / peak
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on for CUDA)")
    p.add_argument(
        "--cpu-time", action="store_true",
        help="time with process CPU time instead of wall clock (CPU only; for a busy shared machine, use --threads 1)",
    )
    args = p.parse_args(argv)
    if args.cpu_time and args.device != "cpu":
        p.error("--cpu-time only makes sense with --device cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda was asked for but torch sees no CUDA GPU")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    peak = None
    header = f"device={device}"
    if device.type == "cuda":
        peak = matmul_peak(device, torch.bfloat16)
        header += f" ({torch.cuda.get_device_name(device)}), bf16 autocast, measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s"
    else:
        header += f", {torch.get_num_threads()} threads, {'bf16 autocast' if args.bf16 else 'fp32'}"
        header += ", process CPU time" if args.cpu_time else ", wall clock"
    print(f"{header}; batch {args.batch}, warm-up {args.warmup}, median of {args.repeats}")
    for name in args.models.split(","):
        r = bench_one(name.strip(), args, device, peak)
        line = (
            f"{name:28s} ours {r['ours_img_s']:8.1f} img/s   timm {r['timm_img_s']:8.1f} img/s   "
            f"ratio ours/timm {r['ratio']:.3f}x   (max |diff| {r['max_abs_diff']:.1e})"
        )
        if peak is not None:
            line += f"   peak fraction ours {r['ours_peak_frac']:.1%} timm {r['timm_peak_frac']:.1%}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
