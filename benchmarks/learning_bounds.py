"""How much each pretraining method learns on the real nucleus task, over seeds: the bounds of tests/test_learning.py.

    python benchmarks/learning_bounds.py                       # every method, seeds 0-3 (~15 CPU minutes)
    python benchmarks/learning_bounds.py --methods dino mae --seeds 0 1 2 --out runs/bounds
    python benchmarks/learning_bounds.py --out runs/bounds --summary-only   # the table of the runs saved there

Task: :func:`histofm.eval.nuclei.load_nuclei_task`, 1,294 real nuclei of the bundled HGSC field
(connective, inflammatory, neoplastic), 48 px crops shown at 32 px, split by region (checkerboard
of 500 px blocks: 686 training, 608 test nuclei). Each method pretrains a tiny ViT (2 blocks, 64
wide, patch 8) on the training nuclei's crops without labels, with the recipe of
``tests/ssl_check.py`` (``LEARNING``: the same settings the CI test runs). The score is the
balanced accuracy of a weighted kNN (k = 20, T = 0.07) on the held-out nuclei; the *gain* is
the score after pretraining minus the score of the same network at its random initialisation
(same seed, same architecture).

Per method it prints the gain's mean, standard deviation and ``n`` over seeds, and the bound
``mean - 2 std`` the CI test asserts where that bound is above zero; where it is not, the test
asserts what the method does show (the loss falls, RankMe rises) and ``docs/results.md`` says
so. The loss is the mean of the first and last tenth of the run; RankMe comes from the
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


def summarise_runs(runs: list[dict]) -> dict:
    """Mean, std (n - 1), n and ``mean - 2 std`` of the gains, with the loss and RankMe trends."""
    gains = [r["gain"] for r in runs]
    mean = statistics.fmean(gains)
    std = statistics.stdev(gains) if len(gains) > 1 else float("nan")
    tenth = lambda loss: max(1, len(loss) // 10)  # noqa: E731
    return {
        "n": len(gains), "mean": mean, "std": std, "bound": mean - 2 * std,
        "before": statistics.fmean(r["knn_before"] for r in runs),
        "after": statistics.fmean(r["knn_after"] for r in runs),
        "loss_first": statistics.fmean(statistics.fmean(r["loss"][: tenth(r["loss"])]) for r in runs),
        "loss_last": statistics.fmean(statistics.fmean(r["loss"][-tenth(r["loss"]):]) for r in runs),
        "rankme_first": statistics.fmean(r["rankme_first"] for r in runs),
        "rankme_last": statistics.fmean(r["rankme_last"] for r in runs),
        "seconds": statistics.fmean(r["seconds"] for r in runs),
    }


def run(method: str, seed: int) -> dict:
    r = ssl_check.learn_nuclei(method, seed)
    r.pop("model")
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
    args = p.parse_args(argv)

    path = Path(args.out) / "learning_bounds.json" if args.out else None
    done: dict[str, list[dict]] = json.loads(path.read_text()) if path and path.is_file() else {}
    for method in args.methods:
        runs = [r for r in done.get(method, []) if r["seed"] in args.seeds]
        for seed in [] if args.summary_only else sorted(set(args.seeds) - {r["seed"] for r in runs}):
            r = run(method, seed)
            runs.append(r)
            print(f"{method:9s} seed {seed}: kNN {r['knn_before']:.3f} -> {r['knn_after']:.3f} ({r['gain']:+.3f}), "
                  f"loss {r['loss'][0]:.2f} -> {r['loss'][-1]:.2f}, RankMe {r['rankme_first']:.1f} -> "
                  f"{r['rankme_last']:.1f}, {r['seconds']:.1f} s", flush=True)
            done[method] = sorted(runs, key=lambda r: r["seed"])
            if path:
                _write_json(path, done)
    print("\n| method | n | kNN random init | kNN pretrained | gain mean | std | mean - 2 std | loss first -> last "
          "| RankMe first -> last | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in [m for m in args.methods if done.get(m)]:
        s = summarise_runs([r for r in done[method] if r["seed"] in args.seeds])
        print(f"| {method} | {s['n']} | {s['before']:.3f} | {s['after']:.3f} | {s['mean']:+.3f} | {s['std']:.3f} | "
              f"{s['bound']:+.3f} | {s['loss_first']:.2f} -> {s['loss_last']:.2f} | "
              f"{s['rankme_first']:.1f} -> {s['rankme_last']:.1f} | {s['seconds']:.0f} |")


if __name__ == "__main__":
    main()
