"""``histofm mil``: weakly supervised slide-level training, prediction on a cohort, and heatmaps.

    histofm mil train --features DIR --labels CSV --aggregator abmil --folds 5 --out DIR
    histofm mil predict --run DIR --features DIR --out DIR
    histofm mil heatmap --features SLIDE.h5 --slide SLIDE.svs --run DIR --out DIR
    histofm mil list
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from histofm.commands._common import add_command
from histofm.commands._vocab import add_deprecated_alias, parse_set
from histofm.errors import HistofmError


def _fold(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fold takes a fold number or 'all', got {value!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "mil", help="slide-level learning from tile features (MIL), prediction and heatmaps",
        example="histofm mil train --features feats/ --labels labels.csv --aggregator abmil --out runs/abmil\n"
        "histofm mil predict --run runs/abmil --features external_feats/ --out preds/\n"
        "histofm mil heatmap --features feats/S01.h5 --slide slides/S01.svs --run runs/abmil --out maps/",
    )
    mil_sub = p.add_subparsers(dest="mil_command", metavar="ACTION")

    t = add_command(
        mil_sub, "train", help="cross-validated training of a MIL aggregator (patient-grouped folds)",
        example="histofm mil train --features feats/ --labels labels.csv --aggregator abmil --folds 5 --out runs/abmil\n"
        "histofm mil train --features feats/ --labels os.csv --task survival --time-col months --event-col dead "
        "--set loss=cox --batch-size 16 --out runs/os",
    )
    data = t.add_mutually_exclusive_group(required=True)
    data.add_argument("--features", type=Path, help="directory of <slide_id>.h5 tile-feature files (MIL)")
    data.add_argument("--slide-embeddings", type=Path, metavar="DIR",
                      help="a slide_embeddings_<encoder> folder of `histofm slide-embed`: cross-validated linear "
                      "probe on slide embeddings instead of MIL (classification only)")
    t.add_argument("--labels", type=Path, required=True,
                   help="CSV with columns slide_id,label[,patient_id] (survival: slide_id,TIME,EVENT[,patient_id])")
    t.add_argument("--aggregator", default="abmil", help="aggregator name (see `histofm mil list`)")
    t.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="aggregator option (hidden_dim=128, gated=false) or training setting (loss=cox, patience=5, "
                   "val_fraction=0.2, n_bins=4, class_weight=false, n_boot=1000, precision=bf16); repeatable")
    t.add_argument("--task", choices=("classification", "survival"), default="classification",
                   help="slide labels (column label) or follow-up times and events")
    t.add_argument("--time-col", default="time", help="follow-up time column of --labels (survival)")
    t.add_argument("--event-col", default="event", help="event column of --labels, 1 = event, 0 = censored (survival)")
    t.add_argument("--folds", type=int, default=5, help="cross-validation folds, grouped by patient")
    t.add_argument("--epochs", type=int, default=20, help="most epochs (early stopping on the validation loss)")
    t.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    t.add_argument("--batch-size", type=int, default=1, help="slides per step (padded with a mask)")
    t.add_argument("--max-tiles", type=int, default=None, help="random subset of tiles per slide in training")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and folds")
    t.add_argument("--device", default=None, help="cpu, cuda, mps; None picks the best available")
    t.add_argument("--out", type=Path, required=True, help="run directory (models, log, predictions, metrics)")
    t.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out (also done whenever its settings match this command)")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out holds a run (finished or not) with other settings")
    add_deprecated_alias(t, "--model", "--aggregator")  # hidden old spellings, one notice each
    add_deprecated_alias(t, "--option", "--set")
    t.set_defaults(func=run_train)

    pr = add_command(
        mil_sub, "predict", help="score an external cohort with a trained run (ensemble of folds, or one)",
        example="histofm mil predict --run runs/abmil --features external_feats/ --out preds/",
    )
    pr.add_argument("--run", type=Path, required=True, help="output directory of `histofm mil train`")
    pr.add_argument("--features", type=Path, required=True, help="directory of feature files (or one .h5)")
    pr.add_argument("--fold", type=_fold, default="all", metavar="K|all",
                    help="one fold's model, or all (ensemble; a slide of the training cohort gets its held-out model)")
    pr.add_argument("--out", type=Path, required=True, help="output directory (predictions.csv, tile_scores/)")
    pr.set_defaults(func=run_predict)

    h = add_command(
        mil_sub, "heatmap", help="per-tile scores over the slide: PNG, HDF5/CSV tables and QuPath GeoJSON",
        example="histofm mil heatmap --features feats/S01.h5 --slide slides/S01.svs --run runs/abmil --out maps/",
    )
    h.add_argument("--features", type=Path, required=True, help="the slide's features .h5 (with coords)")
    h.add_argument("--slide", type=Path, required=True, help="the slide file the features came from")
    h.add_argument("--run", type=Path, default=None, help="output directory of `histofm mil train`")
    h.add_argument("--fold", type=_fold, default="all", metavar="K|all",
                   help="one fold's model, or all (ensemble; a slide of the training cohort gets its held-out model)")
    h.add_argument("--size", type=int, default=1024, help="longer side of the thumbnail in pixels")
    h.add_argument("--alpha", type=float, default=0.5, help="opacity of the heat overlay")
    h.add_argument("--object-type", choices=("tile", "detection", "annotation"), default="tile",
                   help="QuPath object type of the GeoJSON tiles")
    h.add_argument("--out", type=Path, required=True, help="output directory")
    add_deprecated_alias(h, "--model-dir", "--run")
    h.set_defaults(func=run_heatmap)

    ls = add_command(mil_sub, "list", help="list the MIL aggregators", example="histofm mil list")
    ls.set_defaults(func=run_list)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _run_slide_probe(args: argparse.Namespace) -> int:
    """``mil train --slide-embeddings``: logistic regression on slide embeddings, patient-grouped folds."""
    from rich.console import Console

    from histofm.eval.slide_probe import probe_slide_embeddings

    if args.task != "classification":
        raise HistofmError("--slide-embeddings supports --task classification only; use --features for survival.")
    from histofm.checks import check_out_dir
    from histofm.mil.options import FLAG_OPTIONS

    for flag in ("--folds", "--seed"):
        FLAG_OPTIONS[flag].check(flag, getattr(args, flag[2:]), flag=flag)
    check_out_dir(args.out)
    result = probe_slide_embeddings(args.slide_embeddings, args.labels, args.out, folds=args.folds, seed=args.seed)
    console = Console()
    for name, summary in result.pooled.items():
        console.print(f"{name}: {summary}", highlight=False)
    console.print(f"predictions and metrics in {args.out}", highlight=False)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from histofm.checks import check_device, check_out_dir
    from histofm.mil import build_aggregator, list_aggregators
    from histofm.mil.cv import output_dim
    from histofm.mil.data import BagDataset, read_labels_csv
    from histofm.mil.options import FLAG_OPTIONS, TRAIN_OPTIONS, check_settings
    from histofm.mil.provenance import common_provenance
    from histofm.mil.survival import check_loss
    from histofm.mil.train import MILTrainConfig
    from histofm.train.mil import cross_validate
    from histofm.utils import default_device

    if args.slide_embeddings is not None:
        return _run_slide_probe(args)
    aggregator = args.aggregator
    # Everything the user typed is checked here, before a file is read or a model built.
    for key in ("epochs", "lr", "weight_decay", "batch_size", "max_tiles"):
        TRAIN_OPTIONS[key].check(key, getattr(args, key), flag="--" + key.replace("_", "-"))
    for flag in ("--folds", "--seed"):
        FLAG_OPTIONS[flag].check(flag, getattr(args, flag[2:]), flag=flag)
    if aggregator not in list_aggregators():
        build_aggregator(aggregator, 1, 2)  # raises the "did you mean" sentence
    train_set, model_kwargs = check_settings(aggregator, parse_set(args.settings, example="hidden_dim=128"))
    check_out_dir(args.out)
    check_device(args.device)
    if args.resume and args.overwrite:
        raise HistofmError("--resume continues the unfinished run in --out and --overwrite discards it; pass one.")
    config = MILTrainConfig(
        model=aggregator, model_kwargs=model_kwargs, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, max_tiles=args.max_tiles, seed=args.seed,
        task=args.task,
    )
    config = dataclasses.replace(config, **train_set)
    if config.task == "survival":
        check_loss(config.loss, config.batch_size)
    if args.labels.is_dir():
        raise HistofmError(f"--labels {args.labels} is a folder; pass the labels CSV file.")
    table = read_labels_csv(args.labels, args.task, args.time_col, args.event_col)
    _check_features_folder(args.features)
    bags = BagDataset.from_table(args.features, table.slide_ids)
    provenance = common_provenance(bags.paths)
    try:  # fail early on options that only the constructor can judge
        build_aggregator(config.model, bags.dim, output_dim(table, config), **config.model_kwargs)
    except (ValueError, RuntimeError) as e:
        raise HistofmError(f"--set options do not build a {config.model} ({str(e).rstrip('.')}); change them.") from None
    device = args.device or str(default_device())
    console = Console()
    what = f"classes {table.class_names}" if table.task == "classification" else f"{int(table.events.sum())} events"
    console.print(
        f"{len(bags)} slides, {len(set(table.patients))} patients, {what}, {bags.dim}-d features "
        f"({provenance.get('model_name', 'encoder not recorded')}); {args.folds}-fold CV of {aggregator} on {device}"
    )
    if args.resume and not (args.out / "progress.json").is_file():
        console.print(f"nothing to resume in {args.out}; starting a new run")
    summary = cross_validate(bags, table, config, args.folds, args.out, device=device,
                             progress=console.is_terminal, provenance=provenance, overwrite=args.overwrite)
    keys = ("c_index",) if table.task == "survival" else ("balanced_accuracy", "macro_f1", "auroc")
    out = Table(title=f"{aggregator}: {args.folds}-fold cross-validation (grouped by patient), 95% bootstrap intervals")
    for col in ("fold", "train", "val", "test", *keys):
        out.add_column(col, justify="right")

    def cell(m: dict[str, Any], k: str) -> str:
        lo, hi = m.get(f"{k}_ci", [None, None])
        return f"{m[k]:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]")

    for m in summary["folds"]:
        out.add_row(str(m["fold"]), str(m["n_train"]), str(m["n_val"]), str(m["n_test"]), *[cell(m, k) for k in keys])
    mean, sd = summary["mean"], summary["sd"]
    out.add_row("mean ± sd", "", "", "", *[f"{mean[k]:.3f} ± {sd[k]:.3f}" for k in keys])
    out.add_row("pooled", "", "", str(len(table.slide_ids)), *[cell(summary["pooled"], k) for k in keys])
    console.print(out)
    console.print(f"models, log.jsonl, predictions.csv, metrics.json and run.json written to {args.out}")
    return 0


def _check_features_folder(features: Path | None) -> None:
    """Refuse the parent of ``features_<model>/`` (or of CLAM's ``h5_files/``), naming the folder to pass."""
    from histofm.mil.data import FEATURE_EXTENSIONS

    if features is None or not features.is_dir():
        return  # a file, or a missing folder: the readers say so
    if any(p.suffix.lower() in FEATURE_EXTENSIONS for p in features.iterdir() if p.is_file()):
        return
    inner = sorted(d for d in features.iterdir()
                   if d.is_dir() and any(p.suffix.lower() in FEATURE_EXTENSIONS for p in d.iterdir() if p.is_file()))
    if inner:
        names = ", ".join(d.name for d in inner[:3]) + (" ..." if len(inner) > 3 else "")
        raise HistofmError(f"--features {features} holds no feature files, only the folder(s) {names}; pass the "
                           f"folder of one encoder, e.g. --features {inner[0]}.")


def _check_outputs(out: Path, run: Path) -> None:
    """``--out`` must be writable and must not be the run folder (its predictions.csv would be replaced)."""
    from histofm.checks import check_out_dir

    check_out_dir(out)
    if out.exists() and run.exists() and out.resolve() == run.resolve():
        raise HistofmError(f"--out {out} is the --run folder; write the predictions to another folder.")


def run_predict(args: argparse.Namespace) -> int:
    from histofm.mil.predict import predict_cohort

    _check_outputs(args.out, args.run)
    _check_features_folder(args.features)
    result = predict_cohort(args.run, args.features, args.out, fold=args.fold)
    held = sum("held out" in r["models"] for r in result["rows"])
    note = f" ({held} slide(s) of the training cohort scored by their held-out fold model)" if held else ""
    print(f"{len(result['rows'])} slides scored{note}; wrote {result['predictions']} and {result['tile_scores']}/")
    return 0


def run_heatmap(args: argparse.Namespace) -> int:
    from histofm.mil.heatmap import render_heatmap

    run = args.run
    if run is None:
        raise HistofmError("Pass the output folder of `histofm mil train` as --run.")
    if not 0.0 <= args.alpha <= 1.0:  # NaN fails too
        raise HistofmError(f"--alpha must be between 0 and 1, got {args.alpha}.")
    if args.out.suffix.lower() in (".png", ".jpg", ".jpeg"):
        raise HistofmError(f"--out is a directory now (the PNG, tables and GeoJSON go in it), not {args.out.name}.")
    if not 16 <= args.size <= 16384:
        raise HistofmError(f"--size must be between 16 and 16384 pixels, got {args.size}.")
    _check_outputs(args.out, run)
    result = render_heatmap(args.slide, args.features, run, args.out, fold=args.fold,
                            max_size=args.size, alpha=args.alpha, object_type=args.object_type)
    if "probabilities" in result:
        outcome = "slide probabilities: " + ", ".join(f"{k} {v:.3f}" for k, v in result["probabilities"].items())
    else:
        outcome = f"slide risk {result['risk']:.3f}"
    print(f"{result['tiles']} tiles scored by {result['models']}; {outcome}; wrote {result['png'].name}, "
          f"{result['h5'].name}, {result['csv'].name} and {result['geojson'].name} to {args.out}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from histofm.mil import list_aggregators

    print("\n".join(list_aggregators()))
    return 0
