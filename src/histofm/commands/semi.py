"""``histofm semi``: train a tile classifier from a few labelled and many unlabelled images.

    histofm semi --method fixmatch --data tiles/ --labels labels.csv --out run/ --steps 1000

Training runs through the one engine (:func:`histofm.train.semi.fit_semi`), which
writes ``checkpoint.pt`` (``--resume`` continues a killed run exactly), ``log.jsonl``,
``loss_curve.png``, ``config.json`` and ``model.safetensors`` + ``model.json`` (the
classifier and how to rebuild it). Then this command writes ``predictions.csv``
(every image: prediction, confidence, class probabilities), ``metrics.json`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from histofm.commands._common import add_command
from histofm.commands._vocab import add_deprecated_alias, add_set_argument, parse_set
from histofm.errors import HistofmError

SMALL_CNN = "small_cnn"


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "semi", help="semi-supervised tile classification (FixMatch, Mean Teacher, pseudo-labels)",
        description=__doc__,
        example="histofm semi --method fixmatch --data tiles/ --labels labels.csv --out run/ --steps 1000\n"
                "histofm semi --data tiles/ --labels labels.csv --model vit_small_patch16_224 "
                "--checkpoint backbone.safetensors --img-size 224 --out run/",
    )
    p.add_argument("--method", default="fixmatch", choices=("fixmatch", "meanteacher", "pseudolabel", "supervised"),
                   help="semi-supervised method (supervised: the labelled images only, a baseline)")
    p.add_argument("--data", type=Path, required=True, help="folder of tile images (searched recursively)")
    p.add_argument("--labels", type=Path, required=True, help="CSV 'path,label' naming the labelled images")
    p.add_argument("--test-labels", type=Path, help="optional CSV of held-out labelled images to evaluate on")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--model", default=SMALL_CNN, help=f"tile encoder: '{SMALL_CNN}' or a registered model name "
                                                      "(histofm models)")
    add_deprecated_alias(p, "--arch", "--model")
    p.add_argument("--checkpoint", type=Path, help="weights for --model (a registered model)")
    add_set_argument(p, help="constructor override of a registered --model, e.g. --set depth=4 (repeatable)")
    p.add_argument("--width", type=int, default=32, help=f"channels of {SMALL_CNN}'s first stage")
    p.add_argument("--img-size", type=int, default=32, help="images are resized and centre-cropped to this")
    p.add_argument("--steps", type=int, default=500, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=32, help="labelled images per step")
    p.add_argument("--mu", type=int, default=4, help="unlabelled images per labelled one in a step")
    p.add_argument("--lr", type=float, default=0.03,
                   help="peak learning rate (SGD with Nesterov momentum, FixMatch's cosine schedule)")
    p.add_argument("--threshold", type=float, help="confidence threshold of fixmatch and pseudolabel (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="mixed precision")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same flags as the first run)")
    p.add_argument("--ckpt-every", type=int, default=100, help="write OUT/checkpoint.pt every N steps (0: at the end only)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--check", action="store_true", help="check the flags and paths and exit (nothing is read or written)")
    p.set_defaults(func=run)


def build_classifier(model: str, num_classes: int, img_size: int, width: int = 32,
                     checkpoint: Path | None = None,
                     overrides: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The classifier for the tile encoder ``model`` and the JSON-able record that rebuilds it.

    ``overrides`` are constructor arguments of a registered model (``--set``), kept in the record.
    """
    overrides = dict(overrides or {})
    import histofm
    from histofm.learning.semi import Classifier, SmallConvNet

    if model == SMALL_CNN:
        if checkpoint is not None:
            raise HistofmError(f"--checkpoint applies to registered models, not to {SMALL_CNN}; pass --model NAME "
                               "(see `histofm models`) or drop --checkpoint.")
        if overrides:
            raise HistofmError(f"--set applies to registered models, not to {SMALL_CNN} (use --width); pass --model "
                               "NAME (see `histofm models`) or drop --set.")
        clf = Classifier(SmallConvNet(width), num_classes)
        return clf, {"model": model, "width": width}
    info = histofm.model_info(model)  # raises one sentence for an unknown name
    backbone = histofm.create_model(model, checkpoint_path=checkpoint, **overrides)
    patch = getattr(backbone, "patch_size", 1)
    patch = patch[0] if isinstance(patch, tuple) else patch
    if img_size % int(patch):
        raise HistofmError(f"--img-size {img_size} is not a multiple of {model}'s patch size {patch}; "
                           "change --img-size.")
    clf = Classifier(backbone, num_classes, mean=tuple(info.mean), std=tuple(info.std))
    return clf, {"model": model, "overrides": overrides}


def run(args: argparse.Namespace) -> int:
    from histofm.commands._settings import check_model_overrides, check_semi_args
    from histofm.learning import build_semi_method
    from histofm.learning.folder import load_labelled_folder, read_label_csv
    from histofm.learning.semi import SemiData, evaluate
    from histofm.train.loop import skipped_steps
    from histofm.train.semi import fit_semi, semi_config
    from histofm.utils import default_device, seed_everything

    check_semi_args(args)  # every flag's declared type and range (histofm.settings), before any file is read
    overrides = parse_set(args.set)
    if overrides and args.model != SMALL_CNN:
        overrides = check_model_overrides(args.model, overrides)  # a bad value: one sentence, before any work
    if args.check:
        print(f"histofm semi: settings OK ({args.method}, {args.model}); nothing was run.")
        return 0
    test_paths: set[str] = set()
    if args.test_labels is not None:
        test_paths = {Path(p).as_posix() for p, _ in read_label_csv(args.test_labels, "--test-labels")}
    folder = load_labelled_folder(args.data, args.labels, args.img_size, exclude=test_paths)
    overlap = test_paths & set(folder.paths_l)
    if overlap:
        raise HistofmError(f"{sorted(overlap)[0]!r} is in both --labels and --test-labels; keep the test set apart.")
    if len(folder.x_u) == 0:
        raise HistofmError(f"Every image under {args.data} is labelled (or held out); semi-supervised training "
                           "needs unlabelled images too (or use --method supervised with a few left unlabelled).")
    seed_everything(args.seed)
    device = torch.device(args.device) if args.device else default_device()
    clf, model_record = build_classifier(args.model, len(folder.classes), args.img_size, args.width, args.checkpoint,
                                         overrides)
    cfg_overrides: dict[str, Any] = {}
    if args.threshold is not None:
        if args.method not in ("fixmatch", "pseudolabel"):
            raise HistofmError(f"--threshold applies to fixmatch and pseudolabel, not {args.method}.")
        cfg_overrides["threshold"] = args.threshold
    method = build_semi_method(args.method, clf, seed=args.seed, **cfg_overrides)
    data = SemiData(folder.x_l, folder.y_l, folder.x_u, classes=folder.classes)
    out: Path = args.out
    fit_cfg = semi_config(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          device=str(device), precision=args.precision, out_dir=str(out), resume=args.resume,
                          ckpt_every=args.ckpt_every, progress=not args.no_progress)
    start = time.perf_counter()
    record = {**model_record, "classes": list(folder.classes), "img_size": args.img_size, "method": args.method}
    # What a resume must keep besides --mu (fit_semi checks it): another value is refused, naming the flag.
    # The label files come before --data, whose image counts they change.
    run_info = {"--method": args.method, "--model": args.model, "--img-size": args.img_size,
                "--labels": str(args.labels.resolve()),
                "--test-labels": str(args.test_labels.resolve()) if args.test_labels is not None else None,
                "--data": f"{args.data.resolve()} ({len(folder.x_l)} labelled, {len(folder.x_u)} unlabelled images)"}
    history = fit_semi(method, data, fit_cfg, mu=args.mu, record=record,
                       run_info=run_info)  # writes model.safetensors + model.json
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "method": args.method, "model": args.model, "img_size": args.img_size, "steps": args.steps,
        "batch_size": args.batch_size, "mu": args.mu, "lr": args.lr, "seed": args.seed, "seconds": round(seconds, 2),
        "classes": list(folder.classes), "n_labelled": len(folder.x_l), "n_unlabelled": len(folder.x_u),
        "final": _tail_mean(history), "skipped_steps": skipped_steps(history),
        "labelled": evaluate(method, folder.x_l, folder.y_l, device=device),
    }
    if args.test_labels is not None:
        test = load_labelled_folder(args.data, args.test_labels, args.img_size, classes=folder.classes,
                                    labels_flag="--test-labels")
        metrics["test"] = evaluate(method, test.x_l, test.y_l, device=device)
        metrics["n_test"] = len(test.x_l)
    _save_predictions(method, folder, out / "predictions.csv", device)
    _save_json(metrics, out / "metrics.json")
    _save_curves(history, out / "loss.png")
    test_txt = f", test balanced accuracy {metrics['test']['balanced_accuracy']:.3f}" if "test" in metrics else ""
    skipped = metrics["skipped_steps"]
    skip_txt = f" ({skipped} skipped for a non-finite loss or gradient)" if skipped else ""
    print(f"{args.method}: {len(folder.x_l)} labelled + {len(folder.x_u)} unlabelled images, {args.steps} steps"
          f"{skip_txt} in {seconds:.1f} s, final loss {metrics['final'].get('loss', float('nan')):.3f}{test_txt}; "
          f"wrote {out}")
    return 0


def _tail_mean(history: list[dict[str, Any]], frac: float = 0.1) -> dict[str, float]:
    tail = history[-max(1, int(len(history) * frac)):]
    keys = sorted({k for h in tail for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                  - {"step"})
    return {k: round(sum(float(h.get(k, 0.0)) for h in tail) / len(tail), 5) for k in keys}


def _save_json(obj: Any, path: Path) -> None:
    from histofm.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def _save_predictions(method: Any, folder: Any, path: Path, device: torch.device) -> None:
    from histofm.learning.semi import predict_proba
    from histofm.utils import atomic_path

    x = torch.cat([folder.x_l, folder.x_u])
    paths = folder.paths_l + folder.paths_u
    given = [folder.classes[int(y)] for y in folder.y_l] + [""] * len(folder.paths_u)
    probs = predict_proba(method, x, device=device)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "prediction", "confidence", *(f"p_{c}" for c in folder.classes)])
        for p, g, pr in zip(paths, given, probs):
            j = int(pr.argmax())
            w.writerow([p, g, folder.classes[j], f"{float(pr[j]):.4f}", *(f"{float(v):.4f}" for v in pr)])


def _save_curves(history: list[dict[str, float]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from histofm.utils import atomic_path

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key in ("loss", "loss_s", "loss_u", "loss_c", "mask_rate"):
        values = [h[key] for h in history if key in h]
        if values:
            ax.plot(values, label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
