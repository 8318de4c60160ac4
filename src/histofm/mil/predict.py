"""Scoring slides with a trained run: per-slide predictions and per-tile scores, for any cohort.

Which models score a slide:

* a slide of the training cohort is scored by the fold model that held it out
  (the others trained on it, and would flatter it), and the output says so;
* any other slide by the ensemble of all fold models (``fold=None``), or by one
  fold's model (``fold=K``, which also applies to training slides).

Ensembles average class probabilities (survival: risks) over the models. Per-tile
scores of different models live on different scales (attention weights, logit
contributions), so each model's scores become percentiles within the slide (as
CLAM does) before they are averaged; the raw scores are kept beside them.

:func:`predict_cohort` checks that every features file has the run's provenance
(:mod:`histofm.mil.provenance`) and writes ``predictions.csv`` and
``tile_scores/<slide>.h5`` (``coords``, ``score``, ``attention``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofm.errors import HistofmError
from histofm.eval.metrics import rankdata
from histofm.mil.base import MILAggregator
from histofm.mil.data import FEATURE_EXTENSIONS, read_bag
from histofm.mil.provenance import check_against_run
from histofm.mil.run import held_out_fold, load_trained
from histofm.mil.survival import risk_from_logits
from histofm.utils import atomic_path


def percentiles(scores: np.ndarray) -> np.ndarray:
    """Scores to their percentile rank in ``[0, 1]`` (ties share their mean rank)."""
    return (rankdata(np.asarray(scores, dtype=np.float64)) - 1) / max(len(scores) - 1, 1)


def tile_size_level0(coords: np.ndarray, attrs: dict[str, Any]) -> float:
    """Tile side in level-0 pixels: ``patch_size_level0``, else ``tile_size * mpp / level0_mpp``, else the grid step."""
    for key in ("patch_size_level0", "size_level0"):
        if key in attrs and float(attrs[key]) > 0:
            return float(attrs[key])
    if all(k in attrs for k in ("tile_size", "mpp", "level0_mpp")) and float(attrs["level0_mpp"]) > 0:
        return float(attrs["tile_size"]) * float(attrs["mpp"]) / float(attrs["level0_mpp"])
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
    steps = [s[s > 0] for s in steps if len(s)]
    if not steps or not any(len(s) for s in steps):
        raise HistofmError("Cannot tell the tile size: the features file has no patch_size_level0 attribute and one tile.")
    return float(min(s.min() for s in steps if len(s)))


def choose_models(
    models: list[MILAggregator], cfg: dict[str, Any], slide_id: str, fold: int | None
) -> tuple[list[MILAggregator], str]:
    """The models that score ``slide_id`` and a description (``"fold 2 (held out this training slide)"``)."""
    if fold is not None:
        chosen = [m for m in models if getattr(m, "fold", None) == fold]
        return chosen, f"fold {fold}"
    held = held_out_fold(cfg, slide_id)
    if held is not None:
        chosen = [m for m in models if getattr(m, "fold", None) == held]
        return chosen, f"fold {held} (held out this training slide)"
    return models, f"ensemble of {len(models)} fold model(s)"


@torch.no_grad()
def score_bag(models: Sequence[MILAggregator], cfg: dict[str, Any], features: np.ndarray) -> dict[str, Any]:
    """One slide's outputs averaged over ``models``.

    Returns:
        ``{"probs": (C,) or None, "risk": float or None, "score": (N,) percentiles or None,
        "attention": (N,) mean raw scores or None}``.
    """
    x = torch.from_numpy(np.asarray(features, dtype=np.float32)).unsqueeze(0)
    survival = cfg.get("task") == "survival"
    outs, pct, raw = [], [], []
    for model in models:
        out = model.eval()(x)
        if survival:
            outs.append(float(risk_from_logits(out.logits.double(), cfg["train"]["loss"])[0]))
        else:
            outs.append(torch.softmax(out.logits.double(), -1)[0].numpy())
        if out.scores is not None:
            s = out.scores[0].double().numpy()
            pct.append(percentiles(s))
            raw.append(s)
    if not np.isfinite(np.asarray(outs, dtype=np.float64)).all() or any(not np.isfinite(s).all() for s in raw):
        raise HistofmError(
            "The run's models give NaN or infinite outputs for this slide; its weights are damaged, train again."
        )
    return {
        "probs": None if survival else np.mean(outs, axis=0),
        "risk": float(np.mean(outs)) if survival else None,
        "score": np.mean(pct, axis=0) if pct else None,
        "attention": np.mean(raw, axis=0) if raw else None,
    }


def write_tile_scores(path: Path, coords: np.ndarray, values: dict[str, np.ndarray], attrs: dict[str, Any]) -> Path:
    """HDF5 with ``coords (N, 2)`` level-0 corners and one ``(N,)`` dataset per value; written atomically."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for k, v in values.items():
                f.create_dataset(k, data=np.asarray(v))
            for k, v in attrs.items():
                if v is not None:
                    f.attrs[k] = v
    return path


def write_tile_csv(path: Path, coords: np.ndarray, values: dict[str, np.ndarray]) -> Path:
    """``x, y, <value>...`` per tile (level-0 top-left corner)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", *values])
        cols = [np.asarray(v) for v in values.values()]
        for i, (x, y) in enumerate(np.asarray(coords).tolist()):
            w.writerow([int(x), int(y), *[f"{float(c[i]):.6g}" for c in cols]])
    return path


def _feature_files(features: Path) -> list[Path]:
    if features.is_file():
        return [features]
    if not features.is_dir():
        raise HistofmError(f"Features not found: {features}; pass a folder of .h5 files (or one file) as --features.")
    files = sorted(p for p in features.iterdir() if p.suffix in FEATURE_EXTENSIONS)
    if not files:
        raise HistofmError(f"{features} holds no .h5 feature files; run `histofm extract` into it first.")
    return files


def predict_cohort(
    run_dir: str | os.PathLike[str],
    features: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fold: int | None = None,
) -> dict[str, Any]:
    """Score every features file in ``features`` with the run's models; write predictions and tile scores.

    Returns:
        ``{"rows": [per-slide dicts], "predictions": path, "tile_scores": folder}``.
    """
    models, cfg = load_trained(run_dir, fold)
    files = _feature_files(Path(features))
    prov = cfg.get("provenance", {})
    for p in files:  # refuse the cohort before writing anything
        check_against_run(p, prov)
    out = Path(out_dir)
    tiles_dir = out / "tile_scores"
    survival = cfg.get("task") == "survival"
    rows = []
    for p in files:
        feats, coords, attrs = read_bag(p)
        if feats.shape[1] != cfg["in_dim"]:
            raise HistofmError(
                f"{p.name} has {feats.shape[1]}-d features but the run was trained on {cfg['in_dim']}-d ones; "
                "extract with the run's encoder."
            )
        chosen, used = choose_models(models, cfg, p.stem, fold)
        res = score_bag(chosen, cfg, feats)
        row: dict[str, Any] = {"slide_id": p.stem, "models": used}
        if survival:
            row["risk"] = res["risk"]
        else:
            row["pred"] = cfg["class_names"][int(np.argmax(res["probs"]))]
            row.update({f"prob_{c}": float(v) for c, v in zip(cfg["class_names"], res["probs"])})
        rows.append(row)
        if coords is not None and res["score"] is not None:
            size0 = tile_size_level0(coords, attrs) if len(coords) > 1 or "patch_size_level0" in attrs else None
            write_tile_scores(tiles_dir / f"{p.stem}.h5", coords, {"score": res["score"], "attention": res["attention"]},
                              {"slide": p.stem, "models": used, "patch_size_level0": size0})
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return {"rows": rows, "predictions": out / "predictions.csv", "tile_scores": tiles_dir}
