"""How much each pretraining method learns on the real nucleus task, over seeds: the bounds of tests/test_learning.py.

    python benchmarks/learning_bounds.py                       # every method, seeds 0-3 (~15 CPU minutes)
    python benchmarks/learning_bounds.py --methods dino mae --seeds 0 1 2 --out runs/bounds
    python benchmarks/learning_bounds.py --out runs/bounds --summary-only   # the table of the runs saved there
    python benchmarks/learning_bounds.py --out runs/bounds --backbones runs/results  # keep the backbones for
    python benchmarks/results_table.py --out runs/results                             # the table (no retraining)

Task: :func:`histofm.eval.nuclei.load_nuclei_task`, 1,294 real nuclei of the bundled HGSC field
(connective, inflammatory, neoplastic), 48 px crops shown at 32 px, split by region (checkerboard
of 500 px blocks: 686 training, 608 test nuclei). Each method pretrains a tiny ViT (2 blocks, 64
wide, patch 8) on the training nuclei's crops without labels, with the recipe of
``tests/ssl_check.py`` (``LEARNING``: the same settings the CI test runs). The score is the
balanced accuracy of a weighted kNN (k = 20, T = 0.07) on the held-out nuclei; the *gain* is
the score after pretraining minus the score of the same network at its random initialisation
(same seed, same architecture).

Stain: the same kNN also scores the test nuclei under every stain shift of
``histofm.data.stain.DEFAULT_SHIFTS`` (HED scale, HED bias, per-crop random HED, Macenko
re-staining to the CMU-1 slide), the four copies pooled (*shifted*) and one by one; the memory
bank is always the clean training nuclei.

Per method it prints the clean and the shifted gain's mean, standard deviation and ``n`` over
seeds, and the bound ``mean - 2 std`` the CI test asserts where that bound is above zero; then
the gain per shift. Where no bound is above zero, the test asserts what the method does show
(the loss falls, RankMe rises) and ``docs/results.md`` says so. The loss is the mean of the first and last tenth of the run; RankMe comes from the
engine's collapse watch at the first and last monitoring step. Every run is single-threaded so
that runs on a busy machine stay comparable; ``--out`` keeps every run as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the recipes live beside the test that asserts them

import ssl_check  # noqa: E402


def _stats(values: list[float]) -> dict:
    """Mean, std (n - 1) and the bound ``mean - 2 std`` of a list of gains."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": mean, "std": std, "bound": mean - 2 * std}


def summarise_runs(runs: list[dict]) -> dict:
    """Mean, std (n - 1), n and ``mean - 2 std`` of the clean and shifted gains, per shift, loss and RankMe trends."""
    tenth = lambda loss: max(1, len(loss) // 10)  # noqa: E731
    shifts = list(runs[0]["per_shift"])
    return {
        "n": len(runs), **_stats([r["gain"] for r in runs]),
        "before": statistics.fmean(r["knn_before"] for r in runs),
        "after": statistics.fmean(r["knn_after"] for r in runs),
        "shifted": {**_stats([r["shifted_gain"] for r in runs]),
                    "before": statistics.fmean(r["shifted_before"] for r in runs),
                    "after": statistics.fmean(r["shifted_after"] for r in runs)},
        "per_shift": {name: {**_stats([r["per_shift"][name]["gain"] for r in runs]),
                             "before": statistics.fmean(r["per_shift"][name]["before"] for r in runs),
                             "after": statistics.fmean(r["per_shift"][name]["after"] for r in runs)}
                      for name in shifts},
        "loss_first": statistics.fmean(statistics.fmean(r["loss"][: tenth(r["loss"])]) for r in runs),
        "loss_last": statistics.fmean(statistics.fmean(r["loss"][-tenth(r["loss"]):]) for r in runs),
        "rankme_first": statistics.fmean(r["rankme_first"] for r in runs),
        "rankme_last": statistics.fmean(r["rankme_last"] for r in runs),
        "seconds": statistics.fmean(r["seconds"] for r in runs),
    }


def run(method: str, seed: int, backbones: Path | None = None) -> dict:
    r = ssl_check.learn_nuclei(method, seed)
    model = r.pop("model")
    if backbones is not None:  # the layout results_table.py reloads from its --out
        from results_table import backbone_path, save_backbone

        save_backbone(model.backbone, r["seconds"], backbone_path(backbones, method, seed))
    r["rankme_first"], r["rankme_last"] = r.pop("monitor_first")["rankme"], r.pop("monitor_last")["rankme"]
    return r


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(ssl_check.LEARNING), choices=list(ssl_check.LEARNING))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--out", default=None, help="directory for learning_bounds.json (every run; reruns resume from it)")
    p.add_argument("--summary-only", action="store_true", help="print the table of the runs in --out, run nothing")
    p.add_argument("--backbones", default=None,
                   help="also keep every pretrained backbone here, as benchmarks/results_table.py --out keeps them "
                        "(give it the same directory and it reloads them instead of pretraining again)")
    args = p.parse_args(argv)

    path = Path(args.out) / "learning_bounds.json" if args.out else None
    if args.summary_only and not (path and path.is_file()):
        sys.exit(f"learning_bounds: --summary-only reads {path or '--out/learning_bounds.json'}, which does not "
                 "exist; run without --summary-only first, or pass the --out of an earlier run.")
    try:
        done: dict[str, list[dict]] = json.loads(path.read_text()) if path and path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        sys.exit(f"learning_bounds: {path} is not a learning_bounds.json this script wrote ({e}); move it away "
                 "and rerun.")
    for method in args.methods:
        # runs saved before the shifted score existed are measured again
        runs = [r for r in done.get(method, []) if r["seed"] in args.seeds and "shifted_gain" in r]
        for seed in [] if args.summary_only else sorted(set(args.seeds) - {r["seed"] for r in runs}):
            r = run(method, seed, Path(args.backbones) if args.backbones else None)
            runs.append(r)
            print(f"{method:9s} seed {seed}: kNN clean {r['knn_before']:.3f} -> {r['knn_after']:.3f} "
                  f"({r['gain']:+.3f}), shifted {r['shifted_before']:.3f} -> {r['shifted_after']:.3f} "
                  f"({r['shifted_gain']:+.3f}), loss {r['loss'][0]:.2f} -> {r['loss'][-1]:.2f}, RankMe "
                  f"{r['rankme_first']:.1f} -> {r['rankme_last']:.1f}, {r['seconds']:.1f} s", flush=True)
            done[method] = sorted(runs + [r for r in done.get(method, []) if r["seed"] not in {x["seed"] for x in runs}],
                                  key=lambda r: r["seed"])
            if path:
                _write_json(path, done)
    summaries = {m: summarise_runs(rs) for m in args.methods
                 if (rs := [r for r in done.get(m, []) if r["seed"] in args.seeds and "shifted_gain" in r])}
    if not summaries:
        sys.exit(f"learning_bounds: no saved run of {', '.join(args.methods)} with seeds "
                 f"{' '.join(map(str, args.seeds))} in {path}; change --methods/--seeds or run without --summary-only.")
    print(table(summaries))


def table(summaries: dict[str, dict]) -> str:
    """The three markdown tables of docs/results.md section 1: clean and shifted gains, gains per shift, trends."""
    lines = ["| method | n | clean: random init | pretrained | gain mean | std | mean - 2 std "
             "| shifted: random init | pretrained | gain mean | std | mean - 2 std |", "|---" * 12 + "|"]
    for m, s in summaries.items():
        h = s["shifted"]
        lines.append(f"| {m} | {s['n']} | {s['before']:.3f} | {s['after']:.3f} | {s['mean']:+.3f} | {s['std']:.3f} | "
                     f"{s['bound']:+.3f} | {h['before']:.3f} | {h['after']:.3f} | {h['mean']:+.3f} | {h['std']:.3f} | "
                     f"{h['bound']:+.3f} |")
    shifts = list(next(iter(summaries.values()))["per_shift"]) if summaries else []
    lines += ["", "| method | " + " | ".join(f"{n}: random init -> pretrained (gain +- std)" for n in shifts) + " |",
              "|---" * (1 + len(shifts)) + "|"]
    for m, s in summaries.items():
        cells = [f"{p['before']:.3f} -> {p['after']:.3f} ({p['mean']:+.3f} +- {p['std']:.3f})"
                 for p in s["per_shift"].values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| method | loss first -> last | RankMe first -> last | s/run |", "|---|---|---|---|"]
    for m, s in summaries.items():
        lines.append(f"| {m} | {s['loss_first']:.2f} -> {s['loss_last']:.2f} | {s['rankme_first']:.1f} -> "
                     f"{s['rankme_last']:.1f} | {s['seconds']:.0f} |")
    return "\n" + "\n".join(lines)


if __name__ == "__main__":
    from histofm.errors import HistofmError

    try:
        main()
    except HistofmError as e:  # bad input: one sentence, exit 2 (as the histofm command does)
        print(f"learning_bounds: {e}", file=sys.stderr)
        sys.exit(2)
