"""``histofm mil``: weakly supervised slide-level training and attention heatmaps.

    histofm mil train --features DIR --labels CSV --model abmil --folds 5 --out DIR
    histofm mil heatmap --features SLIDE.h5 --slide SLIDE.svs --model-dir DIR --out heatmap.png
    histofm mil list
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from histofm.errors import HistofmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mil", help="slide-level learning from tile features (MIL) and attention heatmaps")
    mil_sub = p.add_subparsers(dest="mil_command", metavar="ACTION")

    t = mil_sub.add_parser("train", help="cross-validated training of a MIL aggregator")
    t.add_argument("--features", type=Path, required=True, help="directory of <slide_id>.h5 feature files")
    t.add_argument("--labels", type=Path, required=True, help="CSV with columns slide_id,label[,patient_id]")
    t.add_argument("--model", default="abmil", help="aggregator name (see `histofm mil list`)")
    t.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="aggregator option, e.g. --option gated=false --option hidden_dim=128 (repeatable)")
    t.add_argument("--folds", type=int, default=5)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--batch-size", type=int, default=1, help="slides per step (padded with a mask)")
    t.add_argument("--max-tiles", type=int, default=None, help="random subset of tiles per slide in training")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    t.add_argument("--out", type=Path, required=True, help="output directory (models, predictions, metrics)")
    t.set_defaults(func=run_train)

    h = mil_sub.add_parser("heatmap", help="draw per-tile scores over the slide thumbnail")
    h.add_argument("--features", type=Path, required=True, help="the slide's features .h5 (with coords)")
    h.add_argument("--slide", type=Path, required=True, help="the slide file the features came from")
    h.add_argument("--model-dir", type=Path, required=True, help="output directory of `histofm mil train`")
    h.add_argument("--fold", type=int, default=None, help="use one fold's model (default: average all folds)")
    h.add_argument("--size", type=int, default=1024, help="longer side of the thumbnail in pixels")
    h.add_argument("--alpha", type=float, default=0.5, help="opacity of the heat overlay")
    h.add_argument("--out", type=Path, required=True, help="PNG to write")
    h.set_defaults(func=run_heatmap)

    ls = mil_sub.add_parser("list", help="list the MIL aggregators")
    ls.set_defaults(func=run_list)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _parse_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise HistofmError(f"--option {item!r} is not KEY=VALUE; write for example --option hidden_dim=128.")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run_train(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from histofm.mil.train import MILTrainConfig, cross_validate, load_bags, read_labels_csv
    from histofm.utils import default_device

    for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--folds", args.folds)):
        if value < 1:
            raise HistofmError(f"{name} must be at least 1, got {value}.")
    table = read_labels_csv(args.labels)
    bags = load_bags(args.features, table.slide_ids)
    config = MILTrainConfig(
        model=args.model, model_kwargs=_parse_options(args.option), epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, max_tiles=args.max_tiles, seed=args.seed,
    )
    from histofm.mil import build_aggregator

    build_aggregator(config.model, int(bags[0].shape[1]), len(table.class_names), **config.model_kwargs)  # fail early
    device = args.device or str(default_device())
    console = Console()
    console.print(
        f"{len(bags)} slides, {len(set(table.patients))} patients, classes {table.class_names}, "
        f"{int(bags[0].shape[1])}-d features; {args.folds}-fold CV of {args.model} on {device}"
    )
    summary = cross_validate(bags, table, config, args.folds, args.out, device=device, progress=console.is_terminal)
    out = Table(title=f"{args.model}: {args.folds}-fold cross-validation (grouped by patient)")
    for col in ("fold", "train", "test", "balanced acc", "macro F1", "AUROC"):
        out.add_column(col, justify="right")
    for m in summary["folds"]:
        out.add_row(str(m["fold"]), str(m["n_train"]), str(m["n_test"]), f"{m['balanced_accuracy']:.3f}",
                    f"{m['macro_f1']:.3f}", f"{m['auroc']:.3f}")
    mean, sd = summary["mean"], summary["sd"]
    out.add_row("mean ± sd", "", "", *[f"{mean[k]:.3f} ± {sd[k]:.3f}" for k in ("balanced_accuracy", "macro_f1", "auroc")])
    console.print(out)
    console.print(f"models, predictions.csv and metrics.json written to {args.out}")
    return 0


def run_heatmap(args: argparse.Namespace) -> int:
    from histofm.mil.heatmap import render_heatmap

    if not 0.0 <= args.alpha <= 1.0:
        raise HistofmError(f"--alpha must be between 0 and 1, got {args.alpha}.")
    result = render_heatmap(args.slide, args.features, args.model_dir, args.out, fold=args.fold,
                            max_size=args.size, alpha=args.alpha)
    probs = ", ".join(f"{k} {v:.3f}" for k, v in result["probabilities"].items())
    print(f"{result['tiles']} tiles drawn; slide probabilities: {probs}; wrote {result['png']}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from histofm.mil import list_aggregators

    print("\n".join(list_aggregators()))
    return 0
