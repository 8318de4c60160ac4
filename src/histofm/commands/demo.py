"""``histofm demo``: the end-to-end job on bundled data (the README's first command)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from histofm.checks import check_out_dir
from histofm.commands._common import add_command
from histofm.errors import HistofmError

#: What ``--quick`` changes in :class:`histofm.demo.DemoConfig`.
QUICK = {"steps": 10, "batch_size": 16, "tiles_per_source": 64, "eval_seeds": 1, "eval_episodes": 10,
         "eval_boot": 50, "cluster_tile": 112, "stain_shifts": ("hed-scale",)}


def register(sub: argparse._SubParsersAction) -> None:
    from histofm.demo import DemoConfig

    p = add_command(
        sub, "demo", help="tile, pretrain (DINOv2), evaluate, cluster and report, on the bundled data only",
        example="histofm demo --out demo_out\nhistofm demo --quick --out demo_check",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="the one seed of the run")
    p.add_argument("--steps", type=int, default=None,
                   help=f"pretraining steps (default: {DemoConfig.steps}; {QUICK['steps']} with --quick)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"pretraining batch size (default: {DemoConfig.batch_size}; {QUICK['batch_size']} with --quick)")
    p.add_argument("--quick", action="store_true", help="a reduced run (a minute or two) to check the set-up")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histofm.demo import DemoConfig, run_demo

    check_out_dir(args.out)
    if not 0 <= args.seed < 2**32:  # numpy's and torch's seeders refuse the rest
        raise HistofmError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {args.seed}.")
    cfg = DemoConfig(seed=args.seed)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
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
