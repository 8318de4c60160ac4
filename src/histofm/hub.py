"""Download official weights through ``huggingface_hub`` (never at import, never in tests).

Every failure ends in one sentence that says what to do: for a gated repository,
accept its licence on the model page and log in (``huggingface-cli login`` or ``HF_TOKEN``);
offline, pass a local copy (``--checkpoint PATH``, ``checkpoint_path=`` in Python).
``huggingface_hub`` honours ``HF_HOME``, ``HF_HUB_OFFLINE`` and its local cache: with
``HF_HUB_OFFLINE=1`` a cached snapshot (``refs/main`` -> ``snapshots/<commit>/``) is used
without any network call.
"""

from __future__ import annotations

from pathlib import Path

from histofm._registry import ModelInfo
from histofm.errors import HistofmError

_SNAPSHOT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # preferred order in a snapshot
_FALLBACK = {"pytorch_model.bin": "model.safetensors", "model.safetensors": "pytorch_model.bin"}


def _hub_errors() -> dict[str, tuple[type[BaseException], ...]]:
    """huggingface_hub's exception classes, looked up by name (they moved between versions)."""
    import huggingface_hub

    modules = [getattr(huggingface_hub, "errors", None), getattr(huggingface_hub, "utils", None)]

    def find(*names: str) -> tuple[type[BaseException], ...]:
        found = []
        for name in names:
            for mod in modules:
                cls = getattr(mod, name, None) if mod is not None else None
                if isinstance(cls, type) and issubclass(cls, BaseException):
                    found.append(cls)
                    break
        return tuple(found)

    return {
        "gated": find("GatedRepoError"),
        "offline": find("LocalEntryNotFoundError", "OfflineModeIsEnabled"),
        "missing_repo": find("RepositoryNotFoundError"),
        "missing_file": find("EntryNotFoundError", "RemoteEntryNotFoundError"),
    }


def _explain(info: ModelInfo, error: BaseException) -> HistofmError:
    """Turn a huggingface_hub exception into one actionable sentence."""
    kinds = _hub_errors()
    kind = type(error).__name__
    text = str(error)
    local = "or download the weights yourself and pass --checkpoint PATH (checkpoint_path= in Python)"
    if isinstance(error, kinds["gated"]) or " 401" in text or " 403" in text:
        return HistofmError(
            f"{info.hub_id} is gated: accept its licence on https://huggingface.co/{info.hub_id} with your account, "
            f"then log in with `huggingface-cli login` (or set HF_TOKEN to a read token) and retry, {local} ({kind})."
        )
    if isinstance(error, kinds["offline"] + (ConnectionError, TimeoutError)):
        token = (" (it is gated: accept its licence on the model page and log in with `huggingface-cli login` "
                 "or HF_TOKEN first)") if info.gated else ""
        return HistofmError(
            f"Cannot reach the Hugging Face hub for {info.hub_id} and it is not in the local cache (HF_HOME){token}; "
            f"connect (unset HF_HUB_OFFLINE) and retry, or pass --checkpoint PATH (checkpoint_path= in Python) to a local copy ({kind})."
        )
    if isinstance(error, kinds["missing_repo"]):
        return HistofmError(
            f"{info.hub_id} was not found on the hub or your token cannot see it; check HF_TOKEN, {local} ({kind})."
        )
    return HistofmError(f"Could not download {info.hub_id} ({kind}); {local}.")


def download_weights(info: ModelInfo) -> Path:
    """Fetch the checkpoint named by ``info`` and return its local path (file or snapshot folder).

    Models published as timm files name ``info.hub_filename`` (with ``model.safetensors``
    / ``pytorch_model.bin`` tried in turn); transformers models (``hub_filename=None``)
    download ``config.json`` plus one weights file as a snapshot folder.
    """
    if not info.public_weights or not info.hub_id:
        raise HistofmError(
            f"{info.name} has no published weights; pass --checkpoint PATH (checkpoint_path= in Python) or --random-init."
        )
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise HistofmError(
            "--pretrained needs huggingface_hub (pip install huggingface_hub); or pass --checkpoint PATH."
        ) from None
    kinds = _hub_errors()
    try:
        if info.hub_filename:
            try:
                return Path(hf_hub_download(info.hub_id, info.hub_filename))
            except kinds["missing_file"] as e:  # the repo holds the other format: try it
                other = _FALLBACK.get(info.hub_filename)
                if other is None or isinstance(e, kinds["offline"]):  # "not in the cache" is not "not on the hub"
                    raise
                return Path(hf_hub_download(info.hub_id, other))
        for weights in _SNAPSHOT_WEIGHTS:
            folder = Path(snapshot_download(info.hub_id, allow_patterns=["config.json", weights]))
            if (folder / weights).is_file():
                return folder
        raise HistofmError(f"{info.hub_id} has no {' or '.join(_SNAPSHOT_WEIGHTS)}; pass --checkpoint PATH instead.")
    except HistofmError:
        raise
    except Exception as e:  # huggingface_hub raises many types: gated, offline, not found, HTTP
        raise _explain(info, e) from None
