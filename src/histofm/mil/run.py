"""A run folder of ``mil train``: which models belong to the run, and loading them back.

A run writes ``config.json`` first, then its fold models, and last ``run.json``,
the manifest: the run id, and for each fold its model file, that file's SHA-256,
the slides it held out and (survival NLL) its time bins. Starting a run deletes
the previous manifest, and finishing it deletes ``fold_*.safetensors`` files it
did not write, so a folder reused for a 2-fold run after a 3-fold one, or for
another aggregator, never loads a stale model; a crashed run has no manifest and
is refused. :func:`load_trained` loads only the files the manifest lists, after
checking their hashes and that ``config.json`` carries the same run id.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from histofm.errors import HistofmError
from histofm.mil.base import MILAggregator, build_aggregator
from histofm.utils import atomic_path

MANIFEST = "run.json"
CONFIG = "config.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def begin_run(out_dir: Path, config: dict[str, Any]) -> str:
    """Invalidate any earlier run in ``out_dir`` and write this run's ``config.json``; returns the run id."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    run_id = uuid.uuid4().hex
    with atomic_path(out_dir / CONFIG) as tmp:
        tmp.write_text(json.dumps({**config, "run_id": run_id}, indent=2))
    return run_id


def finish_run(out_dir: Path, run_id: str, folds: list[dict[str, Any]]) -> Path:
    """Write the manifest (last) and delete fold models this run did not write.

    Args:
        folds: per fold ``{"fold": k, "file": name, "test_slides": [...], ...}``; hashes are added here.
    """
    for f in folds:
        f["sha256"] = sha256(out_dir / f["file"])
    doc = {"run_id": run_id, "folds": folds}
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
    keep = {f["file"] for f in folds}
    for stale in out_dir.glob("fold_*.safetensors"):
        if stale.name not in keep:
            stale.unlink()
    return out_dir / MANIFEST


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a finished run, with the manifest under ``"manifest"``."""
    d = Path(run_dir)
    if not (d / CONFIG).is_file():
        raise HistofmError(f"{d} has no config.json; pass the output folder of `histofm mil train` as --run.")
    if not (d / MANIFEST).is_file():
        raise HistofmError(
            f"{d} holds no finished run (no {MANIFEST}: the last `mil train` into it stopped early); "
            "train again or pass another --run."
        )
    cfg = json.loads((d / CONFIG).read_text())
    manifest = json.loads((d / MANIFEST).read_text())
    if cfg.get("run_id") != manifest.get("run_id"):
        raise HistofmError(f"{d}: config.json and {MANIFEST} come from different runs; train into a fresh --out.")
    cfg["manifest"] = manifest
    return cfg


def held_out_fold(cfg: dict[str, Any], slide_id: str) -> int | None:
    """The fold whose model did not train on ``slide_id`` (matched with or without an extension), or ``None``."""
    names = {slide_id, Path(slide_id).stem}
    for f in cfg["manifest"]["folds"]:
        for s in f.get("test_slides", []):
            if s in names or Path(s).stem in names:
                return int(f["fold"])
    return None


def build_from_config(cfg: dict[str, Any]) -> MILAggregator:
    return build_aggregator(cfg["aggregator"], cfg["in_dim"], cfg["out_dim"], **cfg.get("model_kwargs", {}))


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
            model.load_state_dict(load_file(str(path)))
        except RuntimeError:
            raise HistofmError(f"{path.name} does not fit a {cfg['aggregator']} built from config.json; train again.") from None
        model.fold = int(f["fold"])  # type: ignore[assignment]
        models.append(model.eval())
    return models, cfg
