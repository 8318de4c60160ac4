"""Helpers shared by the benchmark scripts: device sync, the matmul peak, ViT FLOPs, alternating timing.

Imported by sibling scripts (``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device,
    dtype: torch.dtype,
    n: int = 8192,
    repeats: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Measured FLOP/s of a large ``n x n`` matmul (the practical peak of this device and dtype)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t = clock()
        a @ b
        sync(device)
        times.append(clock() - t)
    return 2 * n**3 / statistics.median(times)


def vit_flops(model: nn.Module, batch: int, img_size: int, keep: list[float] | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward of a timm-style ViT on square images.

    Patch embedding ``2 n (3 p^2) D``; per block with ``N = n + prefix`` tokens (class and
    register tokens take part in every block): qkv ``2 N D 3D``, scores and attention-weighted
    sum ``2 * 2 N^2 D``, projection ``2 N D^2``, MLP ``2 N D H1 + 2 N H2 D`` (``H1 = H2 = 4D``
    for GELU; ``H1 = 2h, H2 = h`` for packed SwiGLU). ``keep[i]``: the expected fraction of
    samples for which block ``i``'s residual branches are computed (efficient stochastic depth).
    """
    D, p = model.embed_dim, model.patch_size
    n_patches = (img_size // p) ** 2
    N = n_patches + model.num_prefix_tokens
    flops = 2 * n_patches * 3 * p * p * D
    for i, blk in enumerate(model.blocks):
        block = 2 * N * D * 3 * D + 4 * N * N * D + 2 * N * D * D
        block += 2 * N * D * blk.mlp.fc1.out_features + 2 * N * blk.mlp.fc2.in_features * D
        flops += block * (1.0 if keep is None else keep[i])
    return float(flops * batch)


def time_alternating(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    iters: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each function, their order reversed every other repeat."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t = clock()
            for _ in range(iters):
                fns[name]()
            sync(device)
            times[name].append((clock() - t) / iters)
    return {n: statistics.median(v) for n, v in times.items()}


def setup_run(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[torch.device, Callable[[], float], torch.dtype, float | None]:
    """Common start of a benchmark: device, threads, seed, clock, dtype and the measured matmul peak.

    Reads ``args.device``, ``threads``, ``cpu_time``, ``bf16``, ``no_peak`` and ``peak_n``; bf16 on CUDA
    (or with ``--bf16``), fp32 otherwise. Returns ``(device, clock, dtype, peak FLOP/s or None)``.
    """
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    clock = time.process_time if args.cpu_time else time.perf_counter
    dtype = torch.bfloat16 if device.type == "cuda" or args.bf16 else torch.float32
    peak = None
    if not args.no_peak:
        n = args.peak_n or (8192 if device.type == "cuda" else 4096)
        peak = matmul_peak(device, dtype, n=n, repeats=10 if device.type == "cuda" else 5, clock=clock)
    return device, clock, dtype, peak
