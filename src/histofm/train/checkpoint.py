"""Training checkpoints that resume a run exactly, and the exported backbone.

``checkpoint.pt`` holds everything that decides the rest of a run: the method's
state dict (its buffers too: MoCo's queue, DINO's centers), the optimiser and
loss-scaler states, the number of completed steps, the random-number states of
Python, NumPy and torch on every rank, and the history so far. The data order
and every augmentation are functions of (seed, epoch, sample index), so they
need no state. The file holds tensors and plain Python containers only and is
read back with ``torch.load(weights_only=True)``: loading it never runs code.

The exported encoder is ``backbone.safetensors`` plus ``backbone.json``
(``{"arch": ..., "overrides": {...}}``), so
``histofm.create_model(arch, checkpoint_path=".../backbone.safetensors", **overrides)``
rebuilds it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.utils import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "histofm-train-1"


def capture_rng() -> dict[str, Any]:
    """Random states of Python, NumPy and torch (CPU and every CUDA device) as plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (a crash never leaves a half-written file)."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_training_state` (never executes code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HistofmError(f"Training checkpoint {path} is unreadable ({type(e).__name__}); delete it to start over.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise HistofmError(f"{path} is not a histofm training checkpoint; delete it or choose another out_dir.")
    return state


def export_backbone(
    backbone: nn.Module,
    out_dir: Path,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    name: str = "backbone",
) -> Path:
    """Save ``<name>.safetensors`` and ``<name>.json`` in ``out_dir``; returns the weights path.

    ``state_dict``: the tensors to write when ``backbone.state_dict()`` would give shards (FSDP).
    ``name``: the file stem (an objective's ``export_name``; ``backbone`` for pretraining).
    """
    from safetensors.torch import save_file

    source = backbone.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in source.items()}
    weights = out_dir / f"{name}.safetensors"
    with atomic_path(weights) as tmp:
        mode = tmp.stat().st_mode
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(mode)  # safetensors recreates the file as 0600; keep the usual permissions
    meta = {
        "arch": getattr(backbone, "histofm_name", None),
        "overrides": _jsonable(getattr(backbone, "histofm_overrides", {})),
        **(extra or {}),
    }
    with atomic_path(out_dir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def load_backbone(out_dir: str | Path, **kwargs: Any) -> nn.Module:
    """Rebuild the encoder a run exported in ``out_dir`` (reads ``backbone.json``)."""
    from histofm.registry import create_model

    out = Path(out_dir)
    meta_path = out / "backbone.json"
    if not meta_path.is_file():
        raise HistofmError(f"No backbone.json in {out}; is it the out_dir of a finished pretraining run?")
    meta = json.loads(meta_path.read_text())
    if not meta.get("arch"):
        raise HistofmError(f"{meta_path} does not name an architecture; build the model yourself and load_checkpoint().")
    return create_model(meta["arch"], checkpoint_path=out / "backbone.safetensors", **{**meta["overrides"], **kwargs})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        # callables (mlp_factory ...) cannot be stored; the user passes them again
    return out
