"""Weakly supervised slide-level training: fit, predict and patient-grouped cross-validation.

A slide is a bag of tile embeddings (one HDF5 file per slide with ``features (N, D)``
and ``coords (N, 2)``) and has one label. :func:`cross_validate` splits slides
into folds that are stratified by label and grouped by patient (scikit-learn's
``StratifiedGroupKFold``), so no patient has slides on both sides of a split;
trains one aggregator per fold; and writes, atomically, into ``out_dir``:

* ``config.json``: aggregator name and options, class names, training settings;
* ``fold_K.safetensors``: the weights of each fold's model;
* ``predictions.csv``: ``slide_id, patient_id, fold, label, pred, prob_<class>...``;
* ``metrics.json``: per-fold balanced accuracy, macro F1, AUROC and their mean +/- sd.

The loss is class-weighted cross-entropy on the slide logits plus the
aggregator's ``aux_loss`` (CLAM's instance loss, DSMIL's stream losses).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from histofm.errors import HistofmError
from histofm.eval.metrics import classification_metrics
from histofm.mil.base import MILAggregator, build_aggregator
from histofm.utils import atomic_path, seed_everything


@dataclass(frozen=True)
class MILTrainConfig:
    """Settings of one training run.

    Attributes:
        model: aggregator name (see :func:`histofm.mil.list_aggregators`).
        model_kwargs: options of the aggregator (``{"gated": False}`` ...).
        epochs: passes over the training slides.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: slides per step (padded with a mask).
        max_tiles: if set, each training bag is a random subset of at most this many
            tiles every epoch (faster, and a regulariser); prediction uses all tiles.
        seed: seed of initialisation, shuffling and folds.
    """

    model: str = "abmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batch_size: int = 1
    max_tiles: int | None = None
    seed: int = 0


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags ``(N_i, D)`` into ``(B, max N, D)`` zero-padded features and a ``(B, max N)`` mask."""
    n_max = max(b.shape[0] for b in bags)
    x = bags[0].new_zeros(len(bags), n_max, bags[0].shape[1])
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool, device=bags[0].device)
    for i, b in enumerate(bags):
        x[i, : b.shape[0]] = b
        mask[i, : b.shape[0]] = True
    return x, mask


def _progress(total: int, description: str, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), disable=not enabled, transient=True,
    )
    return progress, progress.add_task(description, total=total, info="")


def fit(
    model: MILAggregator,
    bags: Sequence[torch.Tensor],
    labels: Sequence[int] | torch.Tensor,
    config: MILTrainConfig = MILTrainConfig(),
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[float]:
    """Train ``model`` on bags ``(N_i, D)`` with slide labels; returns the mean loss of each epoch."""
    if len(bags) != len(labels) or not bags:
        raise HistofmError(f"fit() needs one label per bag and at least one bag, got {len(bags)} bags and {len(labels)} labels.")
    seed_everything(config.seed)
    y = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(y, minlength=model.num_classes).float()
    class_weight = (counts.sum() / (model.num_classes * counts.clamp_min(1))).to(device)  # inverse frequency
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    bar, task = _progress(config.epochs, f"training {config.model}", progress)
    with bar:
        for _ in range(config.epochs):
            order = torch.randperm(len(bags), generator=gen).tolist()
            total, steps = 0.0, 0
            for s in range(0, len(order), config.batch_size):
                idx = order[s : s + config.batch_size]
                batch = []
                for i in idx:
                    b = bags[i]
                    if config.max_tiles is not None and b.shape[0] > config.max_tiles:
                        b = b[torch.randperm(b.shape[0], generator=gen)[: config.max_tiles]]
                    batch.append(b.to(device, torch.float32))
                x, mask = pad_bags(batch)
                target = y[idx].to(device)
                out = model(x, mask, labels=target)
                loss = F.cross_entropy(out.logits, target, weight=class_weight)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            history.append(total / steps)
            bar.update(task, advance=1, info=f"loss {history[-1]:.4f}")
    model.eval()
    return history


@torch.no_grad()
def predict(
    model: MILAggregator, bags: Sequence[torch.Tensor], device: str | torch.device = "cpu"
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Class probabilities ``(n, C)`` and per-tile scores (one array per bag, or ``None``), bag by bag."""
    model.to(device).eval()
    probs, scores = [], []
    for b in bags:
        out = model(b.to(device, torch.float32).unsqueeze(0))
        probs.append(torch.softmax(out.logits.double(), -1)[0].cpu().numpy())  # float64: no ties at 1.0
        scores.append(None if out.scores is None else out.scores[0].float().cpu().numpy())
    return np.stack(probs), scores


# --------------------------------------------------------------------------- files
@dataclass(frozen=True)
class SlideTable:
    """The labels CSV: one row per slide."""

    slide_ids: list[str]
    labels: np.ndarray  # (n,) int class indices
    patients: list[str]
    class_names: list[str]


def read_labels_csv(path: str | os.PathLike[str]) -> SlideTable:
    """Read ``slide_id, label[, patient_id]`` rows (patient defaults to the slide id)."""
    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"Labels file not found: {path}; give a CSV with columns slide_id,label,patient_id.")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"slide_id", "label"} <= set(rows[0]):
        raise HistofmError(f"{path.name} needs a header with columns slide_id and label (and optionally patient_id).")
    ids = [r["slide_id"].strip() for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise HistofmError(f"Slide {dup!r} appears twice in {path.name}; give each slide one row.")
    raw = [r["label"].strip() for r in rows]
    classes = sorted(set(raw), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    if len(classes) < 2:
        raise HistofmError(f"{path.name} has a single label {classes[0]!r}; slide classification needs two or more.")
    labels = np.array([classes.index(v) for v in raw])
    patients = [(r.get("patient_id") or r["slide_id"]).strip() for r in rows]
    return SlideTable(ids, labels, patients, classes)


def read_bag(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """``features (N, D)``, ``coords (N, 2)`` (or ``None``) and the coords attributes of a features file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"Features file not found: {path}; run `histofm extract` first.")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise HistofmError(f"{path.name} has no 'features' dataset; is it a histofm/CLAM/TRIDENT features file?")
            feats = np.asarray(f["features"][:], dtype=np.float32)
            coords = np.asarray(f["coords"][:]) if "coords" in f else None
            attrs = {**dict(f.attrs), **(dict(f["coords"].attrs) if "coords" in f else {})}
    except OSError as e:
        raise HistofmError(f"Cannot read {path.name} as HDF5 ({e}); the file may be truncated.") from None
    if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM writes (1, N, D) in some versions
        feats = feats[0]
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise HistofmError(f"{path.name}: 'features' must be a non-empty (N, D) array, got shape {feats.shape}.")
    if coords is not None and coords.shape != (feats.shape[0], 2):
        raise HistofmError(f"{path.name}: coords {coords.shape} do not match features {feats.shape}.")
    return feats, coords, attrs


def find_features(features_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """The features file of ``slide_id`` in ``features_dir`` (``<id>.h5`` or ``<id>.hdf5``)."""
    d = Path(features_dir)
    for ext in (".h5", ".hdf5"):
        if (d / f"{slide_id}{ext}").is_file():
            return d / f"{slide_id}{ext}"
    raise HistofmError(f"No features file for slide {slide_id!r} in {d} (expected {slide_id}.h5).")


def load_bags(features_dir: str | os.PathLike[str], slide_ids: Sequence[str]) -> list[torch.Tensor]:
    """Read every slide's features as a float tensor ``(N_i, D)``; all must share ``D``."""
    if not Path(features_dir).is_dir():
        raise HistofmError(f"Features directory not found: {features_dir}.")
    missing = [s for s in slide_ids if not any((Path(features_dir) / f"{s}{e}").is_file() for e in (".h5", ".hdf5"))]
    if missing:
        raise HistofmError(
            f"{len(missing)} slide(s) of the labels file have no features file in {features_dir}, "
            f"e.g. {missing[0]!r}; extract them or drop them from the CSV."
        )
    bags = [torch.from_numpy(read_bag(find_features(features_dir, s))[0]) for s in slide_ids]
    dims = {b.shape[1] for b in bags}
    if len(dims) > 1:
        raise HistofmError(f"Features files have different dimensions {sorted(dims)}; use one encoder for all slides.")
    return bags


# --------------------------------------------------------------------------- cross-validation
def make_folds(labels: np.ndarray, groups: Sequence[str], folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_idx, test_idx)`` pairs, stratified by label and grouped by patient."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups_arr = np.asarray(groups)
    if folds < 2:
        raise HistofmError(f"Cross-validation needs at least 2 folds, got {folds}.")
    for c in np.unique(labels):
        n_pat = len(np.unique(groups_arr[labels == c]))
        if n_pat < folds:
            raise HistofmError(
                f"Class {int(c)} has slides from only {n_pat} patient(s), fewer than the {folds} folds; "
                "lower --folds or add slides."
            )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(labels)), labels, groups_arr)]


def cross_validate(
    bags: Sequence[torch.Tensor],
    table: SlideTable,
    config: MILTrainConfig,
    folds: int,
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train and test one model per fold; write models, predictions and metrics to ``out_dir``.

    Returns:
        ``{"folds": [per-fold metrics], "mean": {...}, "sd": {...}}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    in_dim, num_classes = int(bags[0].shape[1]), len(table.class_names)
    splits = make_folds(table.labels, table.patients, folds, config.seed)
    config_doc = {
        "model": config.model, "model_kwargs": config.model_kwargs, "in_dim": in_dim,
        "num_classes": num_classes, "class_names": table.class_names, "folds": folds,
        "train": asdict(config),
    }
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config_doc, indent=2))
    fold_metrics, rows = [], []
    for k, (tr, te) in enumerate(splits):
        seed_everything(config.seed + k)
        model = build_aggregator(config.model, in_dim, num_classes, **config.model_kwargs)
        fit(model, [bags[i] for i in tr], table.labels[tr], config, device, progress)
        probs, _ = predict(model, [bags[i] for i in te], device)
        m = classification_metrics(table.labels[te], probs)
        m.update(fold=k, n_train=len(tr), n_test=len(te))
        fold_metrics.append(m)
        with atomic_path(out / f"fold_{k}.safetensors") as tmp:
            save_file({n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}, str(tmp))
        for j, i in enumerate(te):
            rows.append(
                [table.slide_ids[i], table.patients[i], k, table.class_names[table.labels[i]],
                 table.class_names[int(probs[j].argmax())], *[f"{p:.6f}" for p in probs[j]]]
            )
    with atomic_path(out / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "patient_id", "fold", "label", "pred", *[f"prob_{c}" for c in table.class_names]])
        w.writerows(rows)
    keys = ("balanced_accuracy", "macro_f1", "auroc")
    summary = {
        "folds": fold_metrics,
        "mean": {key: float(np.nanmean([m[key] for m in fold_metrics])) for key in keys},
        "sd": {key: float(np.nanstd([m[key] for m in fold_metrics], ddof=1)) for key in keys},
    }
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def load_trained(model_dir: str | os.PathLike[str], fold: int | None = None) -> tuple[list[MILAggregator], dict[str, Any]]:
    """The fold models (all, or one) and ``config.json`` of a directory written by :func:`cross_validate`."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise HistofmError(f"{d} has no config.json; point --model-dir at the output of `histofm mil train`.")
    cfg = json.loads((d / "config.json").read_text())
    files = sorted(d.glob("fold_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    if fold is not None:
        files = [p for p in files if p.stem == f"fold_{fold}"]
    if not files:
        raise HistofmError(f"No fold_*.safetensors model in {d}{'' if fold is None else f' for fold {fold}'}.")
    models = []
    for p in files:
        model = build_aggregator(cfg["model"], cfg["in_dim"], cfg["num_classes"], **cfg.get("model_kwargs", {}))
        model.load_state_dict(load_file(str(p)))
        models.append(model.eval())
    return models, cfg
