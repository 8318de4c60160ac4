"""Download official weights through ``huggingface_hub`` (never at import, never in tests)."""

from __future__ import annotations

from pathlib import Path

from histofm.errors import HistofmError
from histofm.registry import ModelInfo


def download_weights(info: ModelInfo) -> Path:
    """Fetch the checkpoint named by ``info`` and return its local path.

    Gated, offline and missing cases end in one sentence saying what to do.
    """
    if not info.public_weights or not info.hub_id:
        raise HistofmError(
            f"{info.name} has no public weights; build it without pretrained=True or pass checkpoint_path."
        )
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise HistofmError(
            "pretrained=True needs huggingface_hub (pip install 'histofm[hub]'); or pass checkpoint_path."
        ) from None
    try:
        if info.hub_filename:
            return Path(hf_hub_download(info.hub_id, info.hub_filename))
        return Path(snapshot_download(info.hub_id, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:  # huggingface_hub raises many types: gated, offline, not found
        kind = type(e).__name__
        if info.gated or "Gated" in kind or "401" in str(e) or "403" in str(e):
            raise HistofmError(
                f"{info.hub_id} is gated: accept its terms on the hub, set HF_TOKEN, and retry; "
                f"or download the file yourself and pass checkpoint_path ({kind})."
            ) from None
        raise HistofmError(
            f"Could not download {info.hub_id} ({kind}); if you are offline, pass checkpoint_path to a local copy."
        ) from None
