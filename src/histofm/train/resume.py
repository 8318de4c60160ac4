"""Resuming a run of the engine (:func:`histofm.train.loop.fit`): what a checkpoint holds, and whether it fits.

A checkpoint holds full (unsharded) tensors keyed by parameter name, the method's and the
optimiser's (:func:`full_states`, read back by :func:`load_states`), so a run may resume with
another number of ranks or the other parallel mode. Before anything is loaded,
:func:`check_resume_run` and :func:`check_resume_config` refuse a checkpoint of another
objective, or one made with other run settings, batch size or seed, in one sentence each.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from histofm.errors import HistofmError
from histofm.train.config import TrainConfig
from histofm.utils.objective import Objective


def full_states(method: Objective, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Method and optimiser states with full tensors, the optimiser's keyed by parameter name.

    Under FSDP this is a collective (every rank must call it; rank 0 receives the tensors).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if fsdp else None
    return get_model_state_dict(method, options=opts), get_optimizer_state_dict(method, optimizer, options=opts)


def load_states(method: Objective, optimizer: torch.optim.Optimizer, state: dict[str, Any], fsdp: bool) -> None:
    """Inverse of :func:`full_states`; every rank loads the full tensors and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True) if fsdp else None
    try:
        set_model_state_dict(method, state["method"], options=opts)
        set_optimizer_state_dict(method, optimizer, state["optimizer"], options=opts)
    except (KeyError, RuntimeError, ValueError) as e:
        raise HistofmError(
            f"The checkpoint does not fit this method or optimiser ({type(e).__name__}); "
            "resume with the settings of the original run or choose another out_dir."
        ) from None


def load_full_weights(method: Objective, weights: dict[str, torch.Tensor], fsdp: bool) -> None:
    """Load full (unsharded) weights into ``method``, e.g. the best ones kept by :class:`~histofm.train.best.BestWeights`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(method, weights, options=StateDictOptions(full_state_dict=True) if fsdp else None)


def objective_name(method: Objective) -> str:
    """The objective's class name, the same whether or not FSDP2 sharded it.

    ``fully_shard`` swaps a module's class for a generated ``FSDP<name>`` subclass of (FSDPModule, the class);
    a sharded run and its resume on one eager process must read as the same objective.
    """
    cls = type(method)
    own = [b for b in cls.__bases__ if not b.__module__.startswith("torch.distributed")]
    return (own[0] if own and len(own) < len(cls.__bases__) else cls).__name__


def check_resume_run(state: dict[str, Any], run_info: dict[str, Any], objective: str, out_dir: Path | None) -> None:
    """Refuse to resume a checkpoint made by another objective or with other ``run_info`` values."""
    saved = state.get("run") or {}
    for key, value in run_info.items():
        if key in saved and saved[key] != value:
            raise HistofmError(
                f"Cannot resume: the checkpoint in {out_dir} was made with {key} {_shown(saved[key])} but this run "
                f"has {key} {_shown(value)}; use the same {key} or another output folder."
            )
    made_by = state.get("objective")
    if made_by is not None and made_by != objective:
        raise HistofmError(
            f"Cannot resume: the checkpoint in {out_dir} was made by {made_by} but this run trains {objective}; "
            "resume with the original method or choose another output folder."
        )


def _shown(value: Any) -> str:  # noqa: ANN401
    return "(not set)" if value is None else str(value)


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse another batch size or seed than the checkpoint's ``saved`` config; warn about other steps."""
    for key in ("batch_size", "seed"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise HistofmError(
                f"Cannot resume: the checkpoint was made with {key}={saved[key]} but this run has "
                f"{key}={getattr(cfg, key)}; use the same value or another out_dir."
            )
    if saved.get("steps") not in (None, cfg.steps):
        warnings.warn(
            f"resuming a run planned for {saved['steps']} steps with steps={cfg.steps}: schedules change", stacklevel=3
        )
