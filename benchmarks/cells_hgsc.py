"""Nucleus instance segmentation on the bundled HGSC field: ViT + UNETR + HoVer-Net head against two baselines.

All three segmenters are measured in the same run on the held-out blocks of the
checkerboard split (:mod:`histofm.cells.train`), with 95% bootstrap intervals over
250 px tiles of those blocks:

1. **classical**: haematoxylin channel + Otsu + distance-transform watershed, its two
   settings (smallest nucleus, smallest marker distance) chosen by PQ on the TRAINING
   blocks; every nucleus gets the training blocks' most frequent type (for mPQ);
2. **random encoder**: the UNETR decoder and heads trained on a frozen, randomly
   initialised ViT-Ti/8 (depth 4);
3. **pretrained encoder**: the same, on the ViT pretrained with DINOv2 on unlabelled
   bundled tiles (the demo's step: stroma field, Aperio slide and the nest field's
   training blocks only).

Usage (about 20-30 minutes on 2 CPU cores)::

    python benchmarks/cells_hgsc.py --out runs/cells
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from histofm.cells.evaluate import evaluate_held_out, format_table, training_majority_type
from histofm.cells.hovernet import HoVerNetConfig, build_hovernet
from histofm.cells.infer import segment_array
from histofm.cells.metrics import seg_stats
from histofm.cells.postprocess import classical_instances
from histofm.cells.train import (
    CellTrainConfig,
    CropSampler,
    load_cell_model,
    load_hgsc,
    save_cell_model,
    split_blocks,
    train_hovernet,
)
from histofm.utils import seed_everything


def tune_classical(image: np.ndarray, inst: np.ndarray) -> tuple[dict[str, int], float]:
    """Settings of the classical baseline with the best binary PQ on the training blocks."""
    best, best_pq = {}, -1.0
    regions = split_blocks(inst.shape, train=True)
    for min_size in (10, 30, 60):
        for min_distance in (3, 5, 8):
            pred = classical_instances(image, min_size=min_size, min_distance=min_distance)
            st = [seg_stats(inst[y0:y1, x0:x1], pred[y0:y1, x0:x1]) for y0, x0, y1, x1 in regions]
            pq = sum(st[1:], st[0]).metrics()["pq"]
            if pq > best_pq:
                best, best_pq = {"min_size": min_size, "min_distance": min_distance}, pq
    return best, best_pq


def predict_held_out(model, cfg, image: np.ndarray, shape: tuple[int, int], context: int = 32):
    """Instances of the held-out blocks only (each with ``context`` px around it): mask and ``{label: type}``."""
    pred = np.zeros(shape, np.int32)
    pred_types: dict[int, int] = {}
    for y0, x0, y1, x1 in split_blocks(shape, train=False):
        cy0, cx0 = max(y0 - context, 0), max(x0 - context, 0)
        cy1, cx1 = min(y1 + context, shape[0]), min(x1 + context, shape[1])
        lab, types, _ = segment_array(model, image[cy0:cy1, cx0:cx1], cfg.mean, cfg.std, tile=cfg.tile, overlap=32)
        inside = lab[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]
        offset = int(pred.max())
        pred[y0:y1, x0:x1] = np.where(inside > 0, inside + offset, 0)
        pred_types.update({offset + i + 1: int(t) for i, t in enumerate(types)})
    return pred, pred_types


def save_overlay(image: np.ndarray, preds: dict[str, np.ndarray], gt: np.ndarray, path: Path) -> None:
    """Outlines of each segmenter's nuclei on one held-out block, beside the ground truth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from skimage.segmentation import find_boundaries

    y0, x0, y1, x1 = split_blocks(gt.shape, train=False)[0]
    panels = {"ground truth": gt, **preds}
    fig = Figure(figsize=(4 * len(panels), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    for i, (name, lab) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        crop = image[y0:y1, x0:x1].copy()
        crop[find_boundaries(lab[y0:y1, x0:x1], mode="inner")] = (0, 255, 0)
        ax.imshow(crop)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/cells", help="output directory")
    ap.add_argument("--results", default=None, help="name of the results files (default: results)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of each decoder")
    ap.add_argument("--batch", type=int, default=8, help="crops per step")
    ap.add_argument("--pretrain-steps", type=int, default=120, help="DINOv2 steps of the demo's pretraining")
    ap.add_argument("--backbone", default=None, help="reuse a pretrained backbone.safetensors instead of pretraining")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: evaluate the cell models an earlier run saved in --out")
    ap.add_argument("--only", choices=("random", "pretrained"), default=None, help="train/evaluate one encoder only")
    ap.add_argument("--skip-classical", action="store_true", help="leave the classical baseline out")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, inst, types = load_hgsc()
    results: dict[str, dict] = {}
    preds: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}

    t = time.time()
    settings, train_pq = ({}, float("nan")) if args.skip_classical else tune_classical(image, inst)
    if not args.skip_classical:
        classical = classical_instances(image, **settings)
        maj = training_majority_type(inst, types)
        results["classical (haematoxylin + watershed)"] = evaluate_held_out(
            inst, types, classical, {i: maj for i in range(1, int(classical.max()) + 1)}, n_boot=args.n_boot)
        preds["classical"] = classical
        timing["classical"] = time.time() - t
        print(f"classical: settings {settings} (training-block PQ {train_pq:.3f}), {time.time() - t:.0f} s", flush=True)

    backbone = args.backbone
    if args.eval_only or args.only == "random":
        backbone = "unused"
    if backbone is None:
        from histofm.demo import DemoConfig, step_pretrain

        t = time.time()
        seed_everything(args.seed)
        info = step_pretrain(DemoConfig(steps=args.pretrain_steps, seed=args.seed), out, progress=False)
        backbone = info["backbone"]
        timing["pretrain"] = time.time() - t
        print(f"pretrained in {time.time() - t:.0f} s: loss {info['loss_first']:.3f} -> {info['loss_last']:.3f}", flush=True)

    enc_kw = {"depth": 4, "img_size": 48}  # the demo's backbone
    for name, ckpt in (("random encoder", None), ("pretrained encoder", backbone)):
        t = time.time()
        seed_everything(args.seed)
        tag = name.split()[0]
        if args.only is not None and args.only != tag:
            continue
        if args.eval_only:
            if not (out / tag / "cells.safetensors").is_file():
                print(f"{name}: no saved model in {out / tag}, skipped", flush=True)
                continue
            model, cfg = load_cell_model(out / tag / "cells.safetensors")
            hist = [json.loads(line) for line in (out / tag / "log.jsonl").read_text().splitlines()]
        else:
            cfg = HoVerNetConfig(encoder="vit_tiny_patch8_224", encoder_kwargs=enc_kw, freeze_encoder=True)
            model = build_hovernet(cfg, encoder_checkpoint=ckpt)
            sampler = CropSampler(image, inst, types, split_blocks(inst.shape, train=True), cfg.tile, cfg.mean,
                                  cfg.std, seed=args.seed)
            hist = train_hovernet(model, sampler, CellTrainConfig(steps=args.steps, batch_size=args.batch,
                                                                  seed=args.seed, progress=False), out_dir=out / tag)
            save_cell_model(model, cfg, out / tag / "cells.safetensors")
        pred, pred_types = predict_held_out(model, cfg, image, inst.shape)
        results[f"ViT-Ti/8 {name} (frozen) + UNETR + HoVer-Net head"] = evaluate_held_out(
            inst, types, pred, pred_types, n_boot=args.n_boot)
        preds[name] = pred
        first, last = np.mean([h["loss"] for h in hist[:20]]), np.mean([h["loss"] for h in hist[-20:]])
        timing[tag + (" (evaluation only)" if args.eval_only else "")] = time.time() - t
        print(f"{name}: loss {first:.3f} -> {last:.3f}, {pred.max()} nuclei, {time.time() - t:.0f} s", flush=True)

    table = format_table(results)
    print(table)
    save_overlay(image, preds, inst, out / f"{args.results or 'held_out'}_block.png")
    stem = args.results or "results"
    (out / f"{stem}.json").write_text(json.dumps(
        {"results": results, "classical_settings": settings, "timing_s": timing,
         "gt_nuclei": int(inst.max()), "pred_nuclei": {k: int(v.max()) for k, v in preds.items()}}, indent=1))
    (out / f"{stem}.md").write_text(table)


if __name__ == "__main__":
    main()
