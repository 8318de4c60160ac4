"""``histofm eval``: frozen-feature evaluation of encoders on real labelled data.

    histofm eval nuclei --model vit_tiny_patch8_224 --checkpoint ckpt.safetensors [--crop 48] [--json out.json]

The encoder's weights are named explicitly: ``--checkpoint PATH``, ``--pretrained`` or
``--random-init``. A random-initialisation row is always shown as a labelled reference.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from histofm.commands._common import add_command
from histofm.commands._vocab import add_deprecated_alias, add_set_argument, parse_set
from histofm.errors import HistofmError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "eval", help="evaluate an encoder's frozen features (kNN, linear probe, few-shot)",
                    example="histofm eval nuclei --model vit_tiny_patch8_224 --checkpoint backbone.safetensors")
    ev = p.add_subparsers(dest="eval_command", metavar="TASK")
    n = add_command(
        ev, "nuclei",
        help="nucleus-type classification on the bundled HGSC field (with colour-histogram and random-init references)",
        example="histofm eval nuclei --model vit_tiny_patch8_224 --checkpoint runs/dino/backbone.safetensors "
                "--set depth=4 --crop 48 --json nuclei.json",
    )
    n.add_argument("--model", required=True, help="encoder name (see `histofm models`)")
    from histofm.weights import add_weights_arguments

    add_weights_arguments(n)
    add_set_argument(n, help="encoder constructor override, e.g. --set depth=4 (repeatable)")
    add_deprecated_alias(n, "--option", "--set")
    n.add_argument("--crop", type=int, default=48, help="crop side in pixels around each nucleus")
    n.add_argument("--resize", action="store_true",
                   help="resize crops to the encoder's input size (otherwise a ViT runs at the crop size)")
    n.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    n.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    n.add_argument("--seeds", type=int, default=3, help="validation splits of the linear probe")
    n.add_argument("--linear-c", type=float, default=None,
                   help="fixed inverse regularisation of the probe instead of the validation sweep (baselines: 1)")
    n.add_argument("--shots", type=int, default=10, help="supports per class in few-shot episodes")
    n.add_argument("--episodes", type=int, default=100, help="few-shot episodes")
    n.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the confidence intervals")
    n.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    n.add_argument("--stain-shift", default="hed-scale,hed-bias,hed-random,macenko:cmu", metavar="NAME[,NAME]",
                   help="also score test crops with these stain shifts (features fitted on the original stain); "
                        "'none' for the clean column only; names in histofm.data.stain.STAIN_SHIFTS")
    n.set_defaults(func=run_nuclei_command)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _cell(m: object) -> str:
    from histofm.eval.metrics import MetricSummary

    assert isinstance(m, MetricSummary)
    spread = f" ± {m.sd:.3f}" if m.n_seeds > 1 else ""
    return f"{m.mean:.3f}{spread} [{m.ci_low:.3f}, {m.ci_high:.3f}]"


def _short(m: object) -> str:
    from histofm.eval.metrics import MetricSummary

    assert isinstance(m, MetricSummary)
    return f"{m.mean:.3f} [{m.ci_low:.2f}, {m.ci_high:.2f}]"


def run_nuclei_command(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from histofm.commands._settings import check_eval_nuclei_args, check_model_overrides
    from histofm.data.stain import parse_stain_shifts
    from histofm.eval.nuclei import BASELINES, run_nuclei

    check_eval_nuclei_args(args)  # declared types and ranges, --device, --json: before any work
    for name, value in (("--seeds", args.seeds), ("--shots", args.shots), ("--episodes", args.episodes)):
        if value < 1:
            raise HistofmError(f"{name} must be at least 1, got {value}.")
    overrides = parse_set(args.set)  # a bad --set fails before any work
    for key in ("depth", "num_heads", "embed_dim"):  # a zero-block encoder would be scored silently
        value = overrides.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HistofmError(f"--set {key} must be a whole number of at least 1, not {value!r}.")
    overrides = check_model_overrides(args.model, overrides)  # types, ranges, what the encoder accepts
    if args.bootstrap < 0:
        raise HistofmError(f"--bootstrap must be 0 or more, got {args.bootstrap}.")
    from histofm.weights import resolve_weights

    checkpoint, weights = resolve_weights(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                                          random_init=args.random_init)
    from histofm.commands._recorded_arch import check_recorded_arch

    check_recorded_arch(checkpoint, args.model, overrides)  # a histofm export names its --model/--set
    shifts = parse_stain_shifts(args.stain_shift)  # bad, empty or repeated names: before any work
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise HistofmError(f"Unknown --device {args.device!r}; use cpu, cuda or mps.") from None
    console = Console()
    if not console.is_terminal:  # logs and pipes: keep each table row on one line
        console = Console(width=160)
    rows = run_nuclei(
        args.model, checkpoint=checkpoint, crop=args.crop, resize=args.resize, device=device, seed=args.seed,
        seeds=args.seeds, shots=args.shots, episodes=args.episodes, n_boot=args.bootstrap, linear_C=args.linear_c,
        overrides=overrides, progress=console.is_terminal, stain_shifts=shifts,
    )
    table = Table(title=f"Nucleus type on the HGSC nest field (3 classes, 686 train / 608 test nuclei, {args.crop} px crops)")
    cols = ["features", "dim", "protocol", "balanced accuracy", "macro F1", "AUROC (OvR)",
            *[f"bal. acc. {name}" for name in shifts]]
    for col in cols:
        table.add_column(col, justify="left" if col in ("features", "protocol") else "right")
    by_key = {(r.features, r.protocol, r.shift): r for r in rows}
    for r in (r for r in rows if r.shift == "clean"):
        table.add_row(r.features, str(r.dim), r.protocol, _cell(r.metrics["balanced_accuracy"]),
                      _cell(r.metrics["macro_f1"]), _cell(r.metrics["auroc"]),
                      *[_short(by_key[(r.features, r.protocol, name)].metrics["balanced_accuracy"]) for name in shifts])
    console.print(table)
    console.print("mean [95% interval]; ± sd over probe seeds; few-shot interval = spread over episodes. Shifted "
                  "columns: only the test crops' stain changes; every protocol is fitted on the original stain.")
    console.print("Baselines (balanced accuracy, peer libraries): " + "; ".join(
        f"{k}: kNN {v['knn']:.3f}, linear {v['linear']:.3f}" for k, v in BASELINES.items()))
    if args.json is not None:
        from histofm.utils import atomic_path

        doc = {
            "task": "hgsc_nest nucleus type", "model": args.model,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None, "weights": weights.attrs(),
            "crop": args.crop, "stain_shifts": shifts,
            "results": [{"features": r.features, "dim": r.dim, "protocol": r.protocol, "shift": r.shift,
                         **{k: asdict(v) for k, v in r.metrics.items()}} for r in rows],
            "baselines": BASELINES,
        }
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(_nan_to_null(doc), indent=2, allow_nan=False))
        console.print(f"wrote {args.json}")
    return 0


def _nan_to_null(value: object) -> object:
    """``doc`` with every non-finite float as ``None``: an interval not computed (``--bootstrap 0``) is JSON null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_null(v) for v in value]
    return value
