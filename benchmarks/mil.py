"""ABMIL and TransMIL on a 50,000-tile bag: forward+backward time and peak memory against straightforward references.

    python benchmarks/mil.py                     # 50,000 tiles of 1024-d features, CPU, 3 repeats
    python benchmarks/mil.py --tiles 20000 --threads 1 --cpu-time

The references are written below the way the papers' public code does it:

* ABMIL: CLAM's gated attention net (two separate ``Linear`` layers for the
  tanh and sigmoid branches, softmax over ``A^T``, ``A @ h``);
* TransMIL: the original model around a Nystrom attention that pads the sequence
  at the front to a multiple of the landmark count, materialises the three
  softmax matrices ``(N, m)``, ``(m, m)``, ``(m, N)`` and multiplies them
  (the lucidrains ``nystrom-attention`` recipe TransMIL uses).

Ours: :class:`histofm.mil.ABMIL` (the same arithmetic; a padded-batch mask) and
:class:`histofm.mil.TransMIL` (both wide Nystrom products through
``scaled_dot_product_attention``, so the ``(N, m)`` softmax matrices are never
kept for backward; exact segment means instead of padding). In training mode,
as measured here, TransMIL skips its per-tile scores (computed in eval mode only).

Before timing, the same weights are loaded into ours and the reference and the
outputs compared (ABMIL; Nystrom attention with one head, where both scale the
pseudo-inverse's start the same way, on a sequence that needs no padding). Each
implementation then runs in its own fresh process: one warm-up forward+backward,
then ``--repeats`` timed ones (median), and the peak resident memory increase
over the process's memory just before the first forward (model and input
already allocated; the kernel's peak-RSS mark is reset there through
``/proc/self/clear_refs``). Ratios are reference / ours: above 1, ours is faster
or smaller.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from histofm.mil import build_aggregator

IN_DIM, NUM_CLASSES = 1024, 2
ABMIL_KW = dict(hidden_dim=512, attn_dim=256, dropout=0.0)  # CLAM's default sizes
TRANSMIL_KW = dict(dim=512, num_heads=8, num_landmarks=256, dropout=0.0)  # the paper's sizes


# ----------------------------------------------------------------------------- references
class RefGatedABMIL(nn.Module):
    """CLAM-style gated attention MIL, one bag ``(N, D)``."""

    def __init__(self, in_dim: int, hidden: int, attn: int, n_classes: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.attention_a = nn.Sequential(nn.Linear(hidden, attn), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(hidden, attn), nn.Sigmoid())
        self.attention_c = nn.Linear(attn, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (N, H)
        a = self.attention_c(self.attention_a(h) * self.attention_b(h))  # (N, 1)
        a = torch.softmax(a.T, dim=1)  # (1, N)
        return self.classifier(a @ h)  # (1, C)


def ref_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).max() * abs_x.sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class RefNystromAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, landmarks: int, iters: int = 6, kernel: int = 33) -> None:
        super().__init__()
        self.heads, self.dim_head, self.m, self.iters = heads, dim_head, landmarks, iters
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.res_conv = nn.Conv2d(heads, heads, (kernel, 1), padding=(kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.m
        if n % m:
            x = F.pad(x, (0, 0, m - n % m, 0))  # pad at the front to a multiple of m
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        q = q * self.dim_head**-0.5
        l = math.ceil(n / m)  # noqa: E741
        q_l = q.reshape(b, self.heads, m, l, self.dim_head).sum(3) / l
        k_l = k.reshape(b, self.heads, m, l, self.dim_head).sum(3) / l
        attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
        attn2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
        attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
        out = (attn1 @ ref_pinv(attn2, self.iters)) @ (attn3 @ v)
        out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))
        return out[:, -n:]


class RefTransMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, dim: int = 512, heads: int = 8, landmarks: int = 256) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = RefNystromAttention(dim, heads, dim // heads, landmarks)
        self.attn2 = RefNystromAttention(dim, heads, dim // heads, landmarks)
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (1, N, dim)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.attn1(self.norm1(h))
        cls, feat = h[:, :1], h[:, 1:]
        grid = feat.transpose(1, 2).reshape(h.shape[0], -1, side, side)
        grid = self.conv7(grid) + grid + self.conv5(grid) + self.conv3(grid)
        h = torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)
        h = h + self.attn2(self.norm2(h))
        return self.head(self.norm(h)[:, 0])


# ----------------------------------------------------------------------------- weights
def abmil_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ours = build_aggregator("abmil", IN_DIM, NUM_CLASSES, **ABMIL_KW)
    ref = RefGatedABMIL(IN_DIM, ABMIL_KW["hidden_dim"], ABMIL_KW["attn_dim"], NUM_CLASSES)
    with torch.no_grad():
        ref.fc[0].load_state_dict(ours.fc[0].state_dict())
        ref.attention_a[0].load_state_dict(ours.attention.V.state_dict())
        ref.attention_b[0].load_state_dict(ours.attention.U.state_dict())
        ref.attention_c.load_state_dict(ours.attention.w.state_dict())
        ref.classifier.load_state_dict(ours.classifier.state_dict())
    return ours, ref


def _copy_nystrom(ref: RefNystromAttention, ours: nn.Module) -> None:
    ref.to_qkv.load_state_dict(ours.qkv.state_dict())
    ref.to_out.load_state_dict(ours.proj.state_dict())
    ref.res_conv.load_state_dict(ours.res_conv.state_dict())


def transmil_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ours = build_aggregator("transmil", IN_DIM, NUM_CLASSES, **TRANSMIL_KW)
    ref = RefTransMIL(IN_DIM, NUM_CLASSES, TRANSMIL_KW["dim"], TRANSMIL_KW["num_heads"], TRANSMIL_KW["num_landmarks"])
    with torch.no_grad():
        ref.fc.load_state_dict(ours.fc.state_dict())
        ref.cls_token.copy_(ours.cls_token)
        ref.norm1.load_state_dict(ours.layer1.norm.state_dict())
        ref.norm2.load_state_dict(ours.layer2.norm.state_dict())
        _copy_nystrom(ref.attn1, ours.layer1.attn)
        _copy_nystrom(ref.attn2, ours.layer2.attn)
        ref.conv7.load_state_dict(ours.pos.proj.state_dict())
        ref.conv5.load_state_dict(ours.pos.proj1.state_dict())
        ref.conv3.load_state_dict(ours.pos.proj2.state_dict())
        ref.norm.load_state_dict(ours.norm.state_dict())
        ref.head.load_state_dict(ours.head.state_dict())
    return ours, ref


def parity() -> dict[str, float]:
    """Max |ours - ref| on shared weights: ABMIL logits, and Nystrom attention without padding."""
    torch.manual_seed(1)
    ours, ref = abmil_pair()
    x = torch.randn(3000, IN_DIM)
    with torch.no_grad():
        d_abmil = (ours(x).logits - ref(x)).abs().max().item()
    from histofm.mil.transmil import NystromAttention

    ours_attn = NystromAttention(512, 1, 64, 256).double()
    ref_attn = RefNystromAttention(512, 1, 64, 256).double()
    _copy_nystrom(ref_attn, ours_attn)
    x = torch.randn(1, 4096, 512, dtype=torch.float64)  # 4096 = 16 x 256 landmarks: no padding
    with torch.no_grad():
        d_nystrom = (ours_attn(x)[0] - ref_attn(x)).abs().max().item()
    return {"abmil_logits": d_abmil, "nystrom_attention": d_nystrom}


# ----------------------------------------------------------------------------- one measurement
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def child(model: str, impl: str, tiles: int, repeats: int, threads: int, cpu_time: bool) -> dict[str, float]:
    torch.set_num_threads(threads)
    pair = abmil_pair() if model == "abmil" else transmil_pair()
    net = pair[0] if impl == "ours" else pair[1]
    del pair  # keep only the measured model alive
    torch.manual_seed(2)
    x = torch.randn(tiles, IN_DIM)
    inp = x if (model == "abmil" and impl == "ref") else x.unsqueeze(0)

    def step() -> None:
        out = net(inp)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        logits.sum().backward()
        net.zero_grad(set_to_none=True)

    _reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    step()  # warm-up; its peak counts for memory
    clock = time.process_time if cpu_time else time.perf_counter
    times = []
    for _ in range(repeats):
        t = clock()
        step()
        times.append(clock() - t)
    peak_kb = _status_kb("VmHWM") - rss0
    return {"seconds": statistics.median(times), "peak_mb": peak_kb / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall clock")
    p.add_argument("--models", nargs="+", default=["abmil", "transmil"], choices=["abmil", "transmil"])
    p.add_argument("--child", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.tiles, args.repeats, args.threads, args.cpu_time)))
        return
    diffs = parity()
    print(f"parity (max |ours - ref|, same weights): ABMIL logits {diffs['abmil_logits']:.2e}, "
          f"Nystrom attention (4096 tokens, 1 head, fp64) {diffs['nystrom_attention']:.2e}")
    clock = "CPU time" if args.cpu_time else "wall clock"
    print(f"{args.tiles:,} tiles x {IN_DIM} features, forward+backward, {args.threads} thread(s), {clock}, "
          f"median of {args.repeats}")
    print(f"{'model':10s} {'impl':5s} {'time (s)':>9s} {'peak MB':>9s}")
    for model in args.models:
        res = {}
        for impl in ("ref", "ours") if model == "abmil" else ("ours", "ref"):  # alternate who goes first
            cmd = [sys.executable, __file__, "--child", model, impl, "--tiles", str(args.tiles), "--repeats",
                   str(args.repeats), "--threads", str(args.threads)] + (["--cpu-time"] if args.cpu_time else [])
            res[impl] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(f"{model:10s} {impl:5s} {res[impl]['seconds']:9.3f} {res[impl]['peak_mb']:9.1f}", flush=True)
        print(f"{model:10s} ratio ref/ours: time {res['ref']['seconds'] / res['ours']['seconds']:.2f}x, "
              f"peak memory {res['ref']['peak_mb'] / max(res['ours']['peak_mb'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
