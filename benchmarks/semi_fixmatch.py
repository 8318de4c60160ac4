"""FixMatch against supervised baselines with 10 % of the labels, over several seeds.

    python benchmarks/semi_fixmatch.py                   # seeds 0-4, 300 steps (the setting of tests/test_semi.py)
    python benchmarks/semi_fixmatch.py --steps 1000 --seeds 0 1 2
    python benchmarks/semi_fixmatch.py --rows supervised+strong "fixmatch t=0.8" --baseline supervised+strong \
        --seeds 0 1 2 3 4 5 6 7                          # the bound of tests/test_semi.py

Task: :func:`histofm.learning.tasks.synthetic_nuclei_task`, 300 generated H&E
nucleus tiles (16 px, 3 classes: small dark round, large pale round with a
nucleolus, spindle; per-tile stain, rotation, position and distractors), 30 of
them labelled (stratified), 600 independent test tiles. Every run uses the same
network (:class:`~histofm.learning.semi.SmallConvNet`, width 16, one conv per
stage), steps, batch (16 labelled, 48 unlabelled), optimiser (the engine's, with
:func:`histofm.train.semi.semi_config`'s defaults and lr 0.1) and BatchNorm
recalibration on the plain training tiles. Rows:

* ``supervised``: labelled tiles only, weak views (the FixMatch paper's baseline);
* ``supervised+strong``: labelled tiles only, the strong views FixMatch uses;
* ``fixmatch t=0.95``, ``fixmatch t=0.8``: plus the 270 unlabelled tiles;
* ``meanteacher``, ``pseudolabel``: with ``--all``.

``--task nucleus`` runs the same rows on the REAL nucleus-type task instead
(:func:`histofm.learning.tasks.nucleus_type_task`: the 1,294 labelled nuclei of
the bundled HGSC field, 40 px crops resized to 24 px, train/test split by
region, 69 of the 686 training nuclei labelled) plus ``supervised, 99 %
labels`` as the ceiling.

The metric is balanced accuracy on the test tiles; the gain is over ``--baseline``
(default ``supervised``), per seed, with its mean and standard deviation (the bound
of ``tests/test_semi.py`` is the mean minus two standard errors of a mean of five
seeds). Each run is single-threaded so runs are comparable on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from histofm.learning import build_semi_method
from histofm.learning.semi import Classifier, SmallConvNet, evaluate
from histofm.learning.tasks import nucleus_type_task, synthetic_nuclei_task
from histofm.train.semi import fit_semi, semi_config
from histofm.utils import seed_everything

ROWS = {
    "supervised": ("supervised", {}),
    "supervised+strong": ("supervised", {"strong": True}),
    "fixmatch t=0.95": ("fixmatch", {}),
    "fixmatch t=0.8": ("fixmatch", {"threshold": 0.8}),
}
EXTRA = {"meanteacher": ("meanteacher", {}), "pseudolabel": ("pseudolabel", {})}


def run_one(method: str, cfg: dict, seed: int, steps: int, mu: int, real: bool = False) -> tuple[float, float]:
    cfg = dict(cfg)
    frac = cfg.pop("label_frac", 0.1)
    if real:
        task = nucleus_type_task(label_frac=frac, crop=40, size=24, seed=seed)
    else:
        task = synthetic_nuclei_task(n_train=300, n_test=600, label_frac=frac, size=16, seed=seed)
    seed_everything(seed)
    m = build_semi_method(method, Classifier(SmallConvNet(16, 1), 3), seed=seed, **cfg)
    start = time.perf_counter()
    fit_semi(m, task.data, semi_config(steps=steps, batch_size=16, lr=0.1, seed=seed, device="cpu"), mu=mu)
    return evaluate(m, task.x_test, task.y_test)["balanced_accuracy"], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--mu", type=int, default=3)
    p.add_argument("--all", action="store_true", help="also Mean Teacher and pseudo-labels")
    p.add_argument("--task", choices=("synthetic", "nucleus"), default="synthetic")
    p.add_argument("--rows", nargs="+", help="run only these rows (names as printed)")
    p.add_argument("--baseline", default="supervised", help="the row the gains are measured against")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = {**ROWS, **(EXTRA if args.all else {})}
    if args.rows:
        rows = {name: rows[name] for name in args.rows}
    if args.task == "nucleus":
        rows["supervised, 99 % labels"] = ("supervised", {"label_frac": 0.99})
    results: dict[str, list[float]] = {name: [] for name in rows}
    for seed in args.seeds:
        for name, (method, cfg) in rows.items():
            acc, sec = run_one(method, cfg, seed, args.steps, args.mu, real=args.task == "nucleus")
            results[name].append(acc)
            print(f"seed {seed}  {name:24s} balanced accuracy {acc:.3f}  ({sec:.0f} s)", flush=True)
    base = results[args.baseline]
    print(f"\n{args.task} task, {args.steps} steps, seeds {args.seeds}")
    print(f"{'method':24s} " + " ".join(f"s{s:<5d}" for s in args.seeds)
          + f"  mean   gain over {args.baseline} (min..max; std)")
    for name, accs in results.items():
        gains = [a - b for a, b in zip(accs, base)]
        std = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        print(f"{name:24s} " + " ".join(f"{a:.3f} " for a in accs)
              + f" {statistics.mean(accs):.3f}  {statistics.mean(gains):+.3f} ({min(gains):+.3f}..{max(gains):+.3f}; "
              f"{std:.3f})")
        if name != args.baseline:
            print(f"{'':24s} per-seed gains " + " ".join(f"{g:+.3f}" for g in gains))


if __name__ == "__main__":
    main()
