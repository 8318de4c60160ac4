"""Peak resident memory while loading the full H-optimus-0 (1.13B parameters, ~4.5 GB fp32) from a file.

Writes a random-weights checkpoint in the published layout (timm names, ``torch.save``
``pytorch_model.bin``), then measures in fresh processes how much the peak RSS grows
while each loader builds the model and every weight is touched:

* ``histofm``: ``create_model("h_optimus_0", checkpoint_path=...)`` builds on the meta
  device and assigns the checkpoint's memory-mapped tensors (one copy);
* ``histofm-bf16``: the same with ``dtype=torch.bfloat16``;
* ``peer``: the common recipe, a model built with real tensors and then
  ``load_state_dict(torch.load(path))`` (two copies), as a reference point.

Usage::

    python benchmarks/load_memory.py [--depth 40] [--dir /tmp] [--skip-peer]

Ratios are peak-RSS growth divided by the file size; the issue asks for < 1.3.
Measured on a shared 2-core CPU machine (full depth, 4.23 GiB file)::

    loader           peak RSS growth  x file size  seconds
    histofm                  4.24 GiB         1.00      5.2
    histofm-bf16             6.34 GiB         1.50     10.0   (first version: read all, then cast)
    peer                     8.47 GiB         2.00     93.9

and again after ``dtype`` loads started casting while reading (2026-11-27,
``--skip-peer``, file pages already in the page cache, hence the short times)::

    histofm                  4.23 GiB         1.00      0.3
    histofm-bf16             2.29 GiB         0.54      1.9

The first bf16 version touched every fp32 page of the memory-mapped file (resident
while mapped) next to the 0.5 x bf16 copy, hence 1.5 x. Now the file is mapped and
cast in groups of about 256 MiB, each mapping released before the next
(``histofm.models.convert.read_state_dict(path, dtype)``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PROBE = r"""
import json, sys, time
import torch
torch.set_num_threads(2)
import histofm

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

mode, path, depth, tiny = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
histofm.create_model("h_optimus_0", depth=1, img_size=28, checkpoint_path=tiny)  # warm up lazy imports
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter after imports
before = status("VmRSS")
t0 = time.perf_counter()
if mode == "histofm":
    model = histofm.create_model("h_optimus_0", depth=depth, checkpoint_path=path)
elif mode == "histofm-bf16":
    model = histofm.create_model("h_optimus_0", depth=depth, checkpoint_path=path, dtype=torch.bfloat16)
else:  # peer: real-tensor model, then a second copy from torch.load
    model = histofm.create_model("h_optimus_0", depth=depth)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
with torch.no_grad():
    for p in model.parameters():
        p.sum()  # touch every weight
seconds = time.perf_counter() - t0
print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": seconds}))
"""


def write_checkpoint(path: Path, depth: int) -> int:
    """Random fp32 weights of h_optimus_0 (``depth`` blocks) saved like the hub's ``pytorch_model.bin``."""
    import torch

    import histofm

    with torch.device("meta"):
        model = histofm.create_model("h_optimus_0", depth=depth)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.empty(v.shape).normal_(0, 0.02, generator=g) for k, v in model.state_dict().items()}
    torch.save(sd, path)
    return sum(v.numel() for v in sd.values())


def measure(mode: str, path: Path, depth: int, tiny: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(path), str(depth), str(tiny)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=40, help="blocks (40 = the full model)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the temporary checkpoint")
    parser.add_argument("--skip-peer", action="store_true", help="skip the two-copy reference (needs ~2x RAM)")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("needs Linux (/proc/self/status)")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "pytorch_model.bin"
        t0 = time.perf_counter()
        n_params = write_checkpoint(path, args.depth)
        size = path.stat().st_size
        print(f"h_optimus_0, {args.depth} blocks: {n_params:,} parameters, file {size / 2**30:.2f} GiB "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        tiny = Path(tmp) / "tiny.bin"
        import torch

        import histofm

        torch.save(histofm.create_model("h_optimus_0", depth=1, img_size=28).state_dict(), tiny)
        modes = ["histofm", "histofm-bf16"] + ([] if args.skip_peer else ["peer"])
        print(f"{'loader':<14}{'peak RSS growth':>18}{'x file size':>13}{'seconds':>9}")
        for mode in modes:
            r = measure(mode, path, args.depth, tiny)
            grow = r["peak"] - r["before"]
            print(f"{mode:<14}{grow / 2**30:>15.2f} GiB{grow / size:>13.2f}{r['seconds']:>9.1f}")
        os.sync()


if __name__ == "__main__":
    main()
