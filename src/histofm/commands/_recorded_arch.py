"""The architecture a histofm checkpoint was exported with, checked against ``--model`` / ``--set``.

``histofm pretrain`` exports its encoder as ``backbone.safetensors`` with ``backbone.json``
beside it, which names the registered architecture (``arch``) and the constructor arguments
it was built with (``overrides``, e.g. ``{"depth": 2}``). A command that loads such a
checkpoint into another architecture would fail deep in the loader with a list of missing
keys; :func:`check_recorded_arch` refuses first, in one sentence that gives the exact
``--model`` and ``--set`` flags that rebuild the encoder. ``extract`` and ``eval nuclei`` use it.
"""

from __future__ import annotations

import json
from pathlib import Path

from histofm.errors import HistofmError

# Constructor arguments that do not change the weights' shapes and are off at inference.
_SHAPELESS = ("drop_rate", "drop_path_rate")


def recorded_arch_file(checkpoint: Path) -> Path | None:
    """The JSON record beside a checkpoint file (``x.safetensors`` -> ``x.json``), or ``backbone.json``
    in a checkpoint folder; ``None`` when there is none."""
    if checkpoint.is_file():
        meta = checkpoint.with_suffix(".json")
    elif checkpoint.is_dir():
        meta = checkpoint / "backbone.json"
    else:
        return None
    return meta if meta.is_file() and meta != checkpoint else None


def check_recorded_arch(checkpoint: Path | None, model: str, overrides: dict[str, object]) -> None:
    """Refuse a ``--model`` or ``--set`` that does not rebuild the architecture recorded beside ``checkpoint``.

    Files that are not histofm's records (no ``arch`` string and ``overrides`` dict, unreadable
    JSON) are ignored: the loader then judges the weights themselves.

    Raises:
        HistofmError: one sentence naming the recorded architecture and the flags to pass.
    """
    meta_path = recorded_arch_file(Path(checkpoint)) if checkpoint is not None else None
    if meta_path is None:
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), str) or not isinstance(meta.get("overrides"), dict):
        return
    recorded = {k: v for k, v in meta["overrides"].items() if not str(k).endswith(_SHAPELESS)}
    if meta["arch"] == model and all(overrides.get(k) == v for k, v in recorded.items()):
        return
    sets = " ".join(f"--set {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in recorded.items())
    raise HistofmError(f"{checkpoint} was written for {meta['arch']}{' with ' + sets if sets else ''} "
                       f"({meta_path.name} beside it); pass --model {meta['arch']}{' ' + sets if sets else ''}.")
