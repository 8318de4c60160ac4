"""The results table of docs/results.md: every pretraining method x protocol x stain, with intervals and runtime.

    python benchmarks/results_table.py --out runs/results          # every method, seed 0 (~5 CPU minutes alone)
    python benchmarks/results_table.py --methods dino mae --seed 1

Task: the real nucleus task of :mod:`histofm.eval.nuclei` (1,294 nuclei of the bundled HGSC field,
connective / inflammatory / neoplastic, split by region: 686 training, 608 test nuclei). Each
method pretrains the tiny ViT of ``tests/ssl_check.py`` on the training nuclei's crops with its CI
recipe (``ssl_check.LEARNING``, the settings ``tests/test_learning.py`` runs), then its frozen
embedding (class token + mean patch token, 48 px crops shown at 32 px) is scored with the three
protocols of :func:`histofm.eval.nuclei.evaluate_features`: weighted kNN (k = 20), a linear probe
(C chosen on a validation split of the training nuclei, 3 splits) and 10-shot SimpleShot (100
episodes). Two references run in the same script: the colour histogram (8 bins per channel) and
the same tiny ViT at random initialisation.

Stain: *clean* scores the test nuclei as they are; *shifted* scores the same test nuclei with their
stain shifted by each of ``histofm.data.stain.DEFAULT_SHIFTS`` (HED scale, HED bias, per-crop HED
jitter at a fixed seed, Macenko re-staining to the bundled CMU-1 skin slide: another lab and
scanner), the four shifted copies pooled into one test set (its bootstrap resamples the pooled
crops, so its interval is a little narrower than four independent test sets would give); a second
table gives every shift on its own (each protocol fitted once and scoring the four copies).
Features are always fitted on the original stain: the kNN memory bank, the probe and the few-shot
prototypes see only unshifted training nuclei. Where that API is not installed the shifted
columns are left out.

Intervals: kNN and linear, 95 % bootstrap over test nuclei; 10-shot, 2.5-97.5 percentiles over
episodes. Runtime: seconds of pretraining (one thread). Writes ``results.json`` and
``results.md`` to ``--out``; a backbone already in ``--out/backbones`` (kept by an earlier run, or by
``benchmarks/learning_bounds.py --backbones``, which trains the same recipes at the same seeds) is
reloaded instead of pretrained again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the recipes live beside the tests that assert them

import ssl_check  # noqa: E402
from histofm.eval.metrics import MetricSummary  # noqa: E402
from histofm.eval.nuclei import colour_histogram, evaluate_features, evaluate_features_shifted  # noqa: E402

PROTOCOLS = ("knn", "linear", "10-shot")


def shifted_crops(crops: np.ndarray) -> dict[str, np.ndarray] | None:
    """The test crops under every default stain shift, ``{name: (m, h, w, 3) uint8}`` (None without the API)."""
    try:
        from histofm.data.stain import DEFAULT_SHIFTS
        from histofm.eval.nuclei import shifted_test_crops
    except ImportError:  # a histofm without the stain-shift API
        return None
    shifts = shifted_test_crops(crops, DEFAULT_SHIFTS)  # {"clean": crops, name: (m, h, w, 3) uint8}
    return {n: shifts[n] for n in DEFAULT_SHIFTS}


def score(embed, crops: np.ndarray, labels: np.ndarray, train: np.ndarray, shifted: dict | None) -> dict:
    """``{stain: {protocol: MetricSummary of balanced accuracy}}`` of one feature extractor.

    Stains: ``clean``, ``shifted`` (every shifted copy pooled into one test set) and each shift's name.
    """
    x = embed(crops)
    xtr, ytr, yte = x[train], labels[train], labels[~train]
    out = {"clean": evaluate_features(xtr, ytr, x[~train], yte)}
    if shifted:
        xs = {name: embed(c) for name, c in shifted.items()}
        out["shifted"] = evaluate_features(xtr, ytr, np.concatenate(list(xs.values())), np.tile(yte, len(xs)))
        out.update(evaluate_features_shifted(xtr, ytr, xs, yte))  # every protocol fitted once, each shift scored
    return {stain: {p: r[p]["balanced_accuracy"] for p in PROTOCOLS} for stain, r in out.items()}


def _cell(m: MetricSummary) -> str:
    return f"{m.mean:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}]"


def markdown(rows: list[dict], stains: list[str]) -> str:
    head = "| features | pretraining s | " + " | ".join(f"{p} {s}" for p in PROTOCOLS for s in stains) + " |"
    lines = [head, "|" + "---|" * (2 + len(PROTOCOLS) * len(stains))]
    for r in rows:
        cells = [_cell(r["scores"][s][p]) for p in PROTOCOLS for s in stains]
        lines.append(f"| {r['features']} | {r['seconds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_per_shift(rows: list[dict], shifts: list[str]) -> str:
    """One cell per shift: ``kNN / linear / 10-shot`` balanced accuracy (means; intervals in results.json)."""
    lines = ["| features | " + " | ".join(f"{s}: kNN / linear / 10-shot" for s in shifts) + " |",
             "|" + "---|" * (1 + len(shifts))]
    for r in rows:
        cells = [" / ".join(f"{r['scores'][s][p].mean:.3f}" for p in PROTOCOLS) for s in shifts]
        lines.append(f"| {r['features']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_backbone(backbone: torch.nn.Module, seconds: float, saved: Path) -> None:
    """Keep a pretrained backbone (safetensors) and its pretraining seconds (JSON beside it), atomically."""
    from safetensors.torch import save_file

    saved.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=saved.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, saved)
    _write(saved.with_suffix(".json"), json.dumps({"seconds": seconds}))


def backbone_path(out: Path, method: str, seed: int) -> Path:
    """Where ``--out`` keeps a method's pretrained backbone (``learning_bounds.py --backbones`` writes the same)."""
    return out / "backbones" / f"{method}_seed{seed}.safetensors"


def pretrained(method: str, seed: int, out: Path | None) -> tuple[torch.nn.Module, float]:
    """Pretrain ``method`` (or reload the backbone an earlier run saved under ``out``); returns it and the seconds."""
    from safetensors.torch import load_file

    saved = backbone_path(out, method, seed) if out else None
    if saved is not None and saved.is_file():
        model, _ = ssl_check.build_nuclei_method(method, seed)
        model.backbone.load_state_dict(load_file(saved))
        return model.backbone.eval(), float(json.loads(saved.with_suffix(".json").read_text())["seconds"])
    t0 = time.perf_counter()
    model = ssl_check.learn_nuclei(method, seed)["model"]
    seconds = time.perf_counter() - t0
    if saved is not None:
        save_backbone(model.backbone, seconds, saved)
    return model.backbone, seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(ssl_check.LEARNING), choices=list(ssl_check.LEARNING))
    p.add_argument("--seed", type=int, default=0, help="seed of the pretraining runs and of the random initialisation")
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    task = ssl_check.nucleus_task()
    crops, labels, train = task.crops, task.labels, task.train
    shifted = shifted_crops(crops[~train])
    shift_names = list(shifted or {})
    stains = ["clean", "shifted"] if shifted else ["clean"]
    print(f"{len(crops)} nuclei ({int(train.sum())} training); shifts: {', '.join(shift_names) or 'none (no API)'}")

    def backbone_embed(backbone: torch.nn.Module):
        return lambda c: ssl_check.nucleus_features(backbone, c).numpy()

    rows = [{"features": "colour histogram", "seconds": "-", "scores": score(colour_histogram, crops, labels, train, shifted)}]
    torch.manual_seed(args.seed)
    import histofm

    random_vit = histofm.create_model("vit_tiny_patch16_224", img_size=ssl_check.NUCLEUS_SIZE, **ssl_check._VIT)
    rows.append({"features": "tiny ViT, random init", "seconds": "-",
                 "scores": score(backbone_embed(random_vit), crops, labels, train, shifted)})
    for method in args.methods:
        backbone, seconds = pretrained(method, args.seed, Path(args.out) if args.out else None)
        rows.append({"features": method, "seconds": f"{seconds:.0f}",
                     "scores": score(backbone_embed(backbone), crops, labels, train, shifted)})
        print(f"{method}: " + ", ".join(f"{p} {s} {_cell(rows[-1]['scores'][s][p])}" for s in stains for p in PROTOCOLS),
              flush=True)
    table = markdown(rows, stains)
    if shift_names:
        table += "\n\nPer shift (kNN / linear / 10-shot):\n\n" + markdown_per_shift(rows, shift_names)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        _write(out / "results.md", table + "\n")
        js = [{**r, "scores": {s: {p: vars(m) for p, m in d.items()} for s, d in r["scores"].items()}} for r in rows]
        _write(out / "results.json", json.dumps({"seed": args.seed, "shifts": shift_names, "rows": js}, indent=1))

if __name__ == "__main__":
    from histofm.errors import HistofmError

    try:
        main()
    except HistofmError as e:  # bad input: one sentence, exit 2 (as the histofm command does)
        print(f"results_table: {e}", file=sys.stderr)
        sys.exit(2)
