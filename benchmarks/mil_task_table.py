"""The real-pixel MIL task's table in docs/evaluation.md: every aggregator at every witness rate.

Runs :func:`histofm.eval.mil_task.run_mil_task` with its defaults (settings chosen on
validation bags, never on test) and prints two markdown tables: test AUROC [95 %
interval] / top-k precision of the aggregator's own tile scores / top-k precision of
occlusion, then the learning rate, epoch and validation AUROC chosen.
About 16 minutes of CPU on one thread (935 s), TransMIL two thirds of it::

    python benchmarks/mil_task_table.py [--aggregators mean,max] [--rates 0.01,0.02] [--json out.json]

The paper-recipe rows of docs/evaluation.md (TransMIL and mean pooling, one bag per step)::

    python benchmarks/mil_task_table.py --aggregators mean,transmil --rates 0.01 --batch-size 1 \
        --weight-decay 1e-5 --lrs 2e-4,5e-4,2e-3 --n-boot 200 --no-occlusion --seed 0   # and 1, 2

and the TransMIL ablations (``--set`` takes JSON values: ``--set ppeg=false``)::

    python benchmarks/mil_task_table.py --aggregators transmil --rates 0.01 --n-boot 200 --no-occlusion \
        --set num_landmarks=256 --set residual_kernel=0 --set ppeg=false --seed 0   # or --set num_layers=1

and the protocol variants of the second TransMIL account (tiles in the tiler's order; an
unlimited training set, every training bag drawn anew each time it is read)::

    python benchmarks/mil_task_table.py --aggregators mean,transmil --rates 0.01 --n-boot 200 --no-occlusion \
        --tile-order coords --seed 0          # or --resample-train [--set residual_kernel=0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from histofm.eval.mil_task import (
    DEFAULT_SETTINGS,
    LR_GRID,
    TILE_ORDERS,
    TRAIN_BUDGET,
    MILTaskResult,
    run_mil_task,
    tile_pools,
)


def markdown(results: list[MILTaskResult]) -> str:
    """The two tables of the docs."""
    rates = sorted({r.rate for r in results})
    cell = {(r.aggregator, r.rate): r for r in results}
    names = list(dict.fromkeys(r.aggregator for r in results))
    head = "| aggregator | " + " | ".join(f"{rate:.0%} witnesses" for rate in rates) + " |"
    rule = "|---|" + "---|" * len(rates)
    lines = [head, rule]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{c.auroc:.3f} [{c.ci_low:.2f}, {c.ci_high:.2f}] / {c.topk_precision:.2f} / {c.occlusion_topk:.2f}"
            for c in (cell[(n, rate)] for rate in rates)) + " |")
    lines += ["", head, rule]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"lr {c.lr:g}, epoch {c.best_epoch}, val {c.val_auroc:.2f}"
            for c in (cell[(n, rate)] for rate in rates)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aggregators", default=",".join(DEFAULT_SETTINGS))
    parser.add_argument("--rates", default="0.01,0.02,0.05,0.1")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bags, initialisation and order")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LR_GRID), help="learning-rate grid")
    parser.add_argument("--batch-size", type=int, default=TRAIN_BUDGET["batch_size"], help="bags per step")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the engine's)")
    parser.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples of the AUROC interval")
    parser.add_argument("--no-occlusion", action="store_true", help="skip the occlusion top-k (faster)")
    parser.add_argument("--tile-order", default="random", choices=TILE_ORDERS,
                        help="random (the protocol: reshuffled every epoch) or coords (image, row, column)")
    parser.add_argument("--resample-train", action="store_true",
                        help="draw every training bag anew each time it is read (a diagnostic: unlimited bags)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an aggregator option for every listed aggregator, e.g. residual_kernel=0 (repeatable)")
    args = parser.parse_args()
    options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    budget = {"batch_size": args.batch_size}
    if args.weight_decay is not None:
        budget["weight_decay"] = args.weight_decay
    torch.set_num_threads(1)
    pools = tile_pools()
    results = []
    for name in args.aggregators.split(","):
        start = time.process_time()
        results += run_mil_task([name], [float(r) for r in args.rates.split(",")], pools=pools, seed=args.seed,
                                lrs=[float(lr) for lr in args.lrs.split(",")], budget=budget, n_boot=args.n_boot,
                                occlusion=not args.no_occlusion, tile_order=args.tile_order,
                                resample_train=args.resample_train,
                                settings={name: {**DEFAULT_SETTINGS[name], **options}} if options else None)
        print(f"{name}: {time.process_time() - start:.0f} s of CPU", flush=True)
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    from histofm.errors import HistofmError

    try:
        main()
    except HistofmError as e:  # bad input: one sentence, exit 2 (as the histofm command does)
        print(f"mil_task_table: {e}", file=sys.stderr)
        sys.exit(2)
