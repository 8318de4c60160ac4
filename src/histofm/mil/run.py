"""A run folder of ``mil train``: which models belong to the run, resuming it, and loading it back.

Files of a run folder, in the order a run writes them:

* ``progress.json`` first: the run id, this run's settings and, as each fold finishes,
  that fold's model file, its SHA-256, its test logits and its log records;
* ``fold_K/``: the training engine's folder of fold K; its ``checkpoint.pt`` (written after
  every epoch: weights, optimiser, best weights, patience count, random states, position in
  the data) lets a killed run resume mid-fold and is deleted when the fold is done;
* ``fold_K.safetensors``: each fold's final model;
* at the end ``config.json`` and last ``run.json``, the manifest: the run id and for each
  fold its model file, its hash, the slides it held out and (survival NLL) its time bins.

Starting a run deletes the previous manifest, and finishing it deletes
``fold_*.safetensors`` files it did not write, so a folder reused for a 2-fold run
after a 3-fold one never loads a stale model. ``config.json`` is written only when a
run is complete, so a killed rerun never leaves new settings beside old weights. A
rerun of the same command resumes the unfinished run in the folder (the settings must
match exactly); other settings are refused unless ``overwrite``. :func:`load_trained`
loads only the files the manifest lists, after checking their hashes and that
``config.json`` carries the same run id; any damage ends in one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from histofm.errors import HistofmError
from histofm.mil.base import MILAggregator, build_aggregator
from histofm.utils import atomic_path

MANIFEST = "run.json"
CONFIG = "config.json"
PROGRESS = "progress.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Atomic safetensors file with the usual permissions (``save_file`` alone makes 0600)."""
    with atomic_path(path) as tmp:
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
    return path


def fold_dir(out_dir: Path, fold: int) -> Path:
    """The training engine's folder of fold ``fold`` (checkpoint while it trains, its per-step log)."""
    return out_dir / f"fold_{fold}"


def _drop_checkpoint(folder: Path) -> None:
    """Delete an engine checkpoint and the temporary files a killed write of it left."""
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    for p in folder.glob(".checkpoint.pt.*.tmp"):
        p.unlink()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise HistofmError(f"{path} is not readable JSON ({what} is damaged); train again into a fresh --out.") from None
    if not isinstance(doc, dict):
        raise HistofmError(f"{path} is not a {what}; train again into a fresh --out.")
    return doc


def begin_run(out_dir: Path, config: dict[str, Any], overwrite: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """Start a run in ``out_dir``, or resume the unfinished one with the same settings.

    Returns:
        the run id and the documents of the folds already finished (empty for a new run).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(config))  # the form it has after a round trip through the file
    progress = out_dir / PROGRESS
    if progress.is_file() and not overwrite:
        try:
            doc = json.loads(progress.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            doc = None
        if isinstance(doc, dict) and doc.get("config") == config and isinstance(doc.get("folds_done"), list):
            return str(doc["run_id"]), list(doc["folds_done"])
        raise HistofmError(
            f"--out {out_dir} holds an unfinished `mil train` run with other settings; rerun that command to "
            "resume it, or pass --overwrite to start this one in its place."
        )
    if not overwrite and (out_dir / MANIFEST).is_file():
        try:
            finished = json.loads((out_dir / CONFIG).read_text(encoding="utf-8"))
            finished.pop("run_id", None)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            finished = None
        if finished != config:  # the same settings retrain to the same result; others would replace it silently
            raise HistofmError(
                f"--out {out_dir} holds a finished `mil train` run with other settings; choose another --out, "
                "or pass --overwrite to replace it."
            )
    abandon_run(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    run_id = uuid.uuid4().hex
    with atomic_path(progress) as tmp:
        tmp.write_text(json.dumps({"run_id": run_id, "config": config, "folds_done": []}))
    return run_id, []


def fold_done(out_dir: Path, fold_doc: dict[str, Any]) -> None:
    """Record a finished fold in ``progress.json`` (its model file is already complete) and drop its checkpoint."""
    progress = out_dir / PROGRESS
    doc = json.loads(progress.read_text(encoding="utf-8"))
    doc["folds_done"] = [f for f in doc["folds_done"] if f["fold"] != fold_doc["fold"]] + [
        {**fold_doc, "sha256": sha256(out_dir / fold_doc["file"])}
    ]
    with atomic_path(progress) as tmp:
        tmp.write_text(json.dumps(doc))
    _drop_checkpoint(fold_dir(out_dir, int(fold_doc["fold"])))


def abandon_run(out_dir: Path) -> None:
    """Forget an unfinished run: its ``progress.json`` and the folds' checkpoints (a rerun starts afresh)."""
    (out_dir / PROGRESS).unlink(missing_ok=True)
    for d in out_dir.glob("fold_*"):
        if d.is_dir():
            _drop_checkpoint(d)


def finish_run(out_dir: Path, run_id: str, config: dict[str, Any], folds: list[dict[str, Any]]) -> Path:
    """Write ``config.json``, then the manifest (last); delete fold models this run did not write.

    Args:
        folds: per fold ``{"fold": k, "file": name, "test_slides": [...], ...}``; hashes are added here.
    """
    for f in folds:
        f["sha256"] = sha256(out_dir / f["file"])
    with atomic_path(out_dir / CONFIG) as tmp:
        tmp.write_text(json.dumps({**config, "run_id": run_id}, indent=2))
    doc = {"run_id": run_id, "folds": folds}
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
    keep = {f["file"] for f in folds}
    for stale in out_dir.glob("fold_*.safetensors"):
        if stale.name not in keep:
            stale.unlink()
    keep_dirs = {fold_dir(out_dir, int(f["fold"])).name for f in folds}
    for stale in out_dir.glob("fold_*"):
        if stale.is_dir() and stale.name not in keep_dirs and stale.name.split("_")[-1].isdigit():
            shutil.rmtree(stale)
    abandon_run(out_dir)
    return out_dir / MANIFEST


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a finished run, with the manifest under ``"manifest"``; damage ends in one sentence."""
    d = Path(run_dir)
    if not d.is_dir():
        raise HistofmError(f"--run {d} is not a folder; pass the output folder of `histofm mil train` as --run.")
    if not (d / CONFIG).is_file():
        hint = " (its `mil train` has not finished)" if (d / PROGRESS).is_file() else ""
        raise HistofmError(f"{d} has no config.json{hint}; pass the output folder of a finished `histofm mil train` as --run.")
    if not (d / MANIFEST).is_file():
        raise HistofmError(
            f"{d} holds no finished run (no {MANIFEST}: the last `mil train` into it stopped early); "
            "train again or pass another --run."
        )
    cfg = _read_json(d / CONFIG, "config.json of `mil train`")
    manifest = _read_json(d / MANIFEST, "run manifest")
    if cfg.get("run_id") != manifest.get("run_id"):
        raise HistofmError(f"{d}: config.json and {MANIFEST} come from different runs; train into a fresh --out.")
    _check_run(d, cfg, manifest)
    cfg["manifest"] = manifest
    return cfg


def _check_run(d: Path, cfg: dict[str, Any], manifest: dict[str, Any]) -> None:
    """The fields every reader of a run uses, with the right types."""
    def ok_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    good = (
        isinstance(cfg.get("aggregator"), str) and ok_int(cfg.get("in_dim")) and ok_int(cfg.get("out_dim"))
        and isinstance(cfg.get("model_kwargs", {}), dict) and cfg.get("task") in ("classification", "survival")
        and isinstance(cfg.get("train"), dict) and isinstance(cfg.get("provenance", {}), dict)
    )
    if good and cfg["task"] == "classification":
        names = cfg.get("class_names")
        good = isinstance(names, list) and len(names) == cfg["out_dim"] and all(isinstance(n, str) for n in names)
    if good and cfg["task"] == "survival":
        good = cfg["train"].get("loss") in ("nll", "cox")
    folds = manifest.get("folds")
    if good:
        good = isinstance(folds, list) and len(folds) > 0 and all(
            isinstance(f, dict) and isinstance(f.get("fold"), int) and isinstance(f.get("sha256"), str)
            and isinstance(f.get("file"), str) and Path(f["file"]).name == f["file"]
            and isinstance(f.get("test_slides", []), list)
            for f in folds
        )
    if not good:
        raise HistofmError(f"{d}: config.json or {MANIFEST} is incomplete or was edited; train again into a fresh --out.")


def held_out_fold(cfg: dict[str, Any], slide_id: str) -> int | None:
    """The fold whose model did not train on ``slide_id`` (matched with or without an extension), or ``None``."""
    names = {slide_id, Path(slide_id).stem}
    for f in cfg["manifest"]["folds"]:
        for s in f.get("test_slides", []):
            if s in names or Path(s).stem in names:
                return int(f["fold"])
    return None


def build_from_config(cfg: dict[str, Any]) -> MILAggregator:
    try:
        return build_aggregator(cfg["aggregator"], cfg["in_dim"], cfg["out_dim"], **cfg.get("model_kwargs", {}))
    except (HistofmError, ValueError, TypeError, RuntimeError) as e:
        raise HistofmError(
            f"config.json describes an aggregator that cannot be built ({str(e).rstrip('.')}); train again."
        ) from None


def load_trained(
    run_dir: str | os.PathLike[str], fold: int | None = None
) -> tuple[list[MILAggregator], dict[str, Any]]:
    """The fold models (all, or one) of a finished run, in eval mode, and its config (with ``"manifest"``)."""
    d = Path(run_dir)
    cfg = read_run(d)
    folds = cfg["manifest"]["folds"]
    if fold is not None:
        folds = [f for f in folds if int(f["fold"]) == fold]
        if not folds:
            have = ", ".join(str(f["fold"]) for f in cfg["manifest"]["folds"])
            raise HistofmError(f"The run in {d} has no fold {fold}; pass --fold one of {have}, or all.")
    models = []
    for f in folds:
        path = d / f["file"]
        if not path.is_file() or sha256(path) != f["sha256"]:
            raise HistofmError(f"{path.name} is missing or was changed after the run in {d} finished; train again.")
        model = build_from_config(cfg)
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError):  # a torn or foreign file
            raise HistofmError(f"{path.name} is not a readable safetensors file; train again.") from None
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise HistofmError(f"{path.name} does not fit a {cfg['aggregator']} built from config.json; train again.") from None
        if not all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point()):
            raise HistofmError(f"{path.name} holds NaN or infinite weights; train again.")
        model.fold = int(f["fold"])  # type: ignore[assignment]
        models.append(model.eval())
    return models, cfg
