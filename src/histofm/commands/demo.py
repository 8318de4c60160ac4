"""``histofm demo``: the end-to-end job on bundled data (the README's first command)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from histofm.errors import HistofmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="tile, pretrain (DINOv2), evaluate, cluster and report, on the bundled data only",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the full demo's)")
    p.add_argument("--batch-size", type=int, default=None, help="pretraining batch size")
    p.add_argument("--quick", action="store_true", help="a reduced run (a minute or two) to check the set-up")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histofm.demo import DemoConfig, run_demo

    cfg = DemoConfig(seed=args.seed)
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=10, batch_size=16, tiles_per_source=64, eval_seeds=1,
                                  eval_episodes=10, eval_boot=50, cluster_tile=112, stain_shifts=("hed-scale",))
    if args.steps is not None:
        if args.steps < 1:
            raise HistofmError(f"--steps must be at least 1, got {args.steps}.")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.batch_size is not None:
        if args.batch_size < 2:
            raise HistofmError(f"--batch-size must be at least 2, got {args.batch_size}.")
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    results = run_demo(args.out, cfg, progress=not args.no_progress)
    print(f"Report: {results['report']}")
    return 0
