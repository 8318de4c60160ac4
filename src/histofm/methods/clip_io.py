"""Save and reload a whole CLIP trained by histofm (both towers), for ``histofm zeroshot --model clip``.

Pretraining exports only the image backbone (``backbone.safetensors``). Zero-shot
use needs the text tower, the projections and the temperature as well, so
:func:`save_clip` writes the whole method: ``clip.safetensors`` (its state dict)
and ``clip.json`` (``{"method": "clip", "arch", "img_size", "overrides"}``), from
which :func:`load_clip` rebuilds it with ``build_method`` and loads the tensors
with ``strict=True``. Nothing in either file runs code when read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histofm.errors import HistofmError
from histofm.methods.clip import CLIP
from histofm.utils import atomic_path

WEIGHTS, META = "clip.safetensors", "clip.json"


def save_clip(method: CLIP, out_dir: str | Path, *, arch: str, img_size: int, overrides: dict[str, Any]) -> Path:
    """Write ``clip.safetensors`` + ``clip.json`` into ``out_dir``; ``overrides`` as given to ``build_method``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in method.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        mode = tmp.stat().st_mode
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(mode)  # safetensors recreates the file as 0600
    meta = {"method": "clip", "arch": arch, "img_size": img_size, "overrides": overrides}
    try:
        text = json.dumps(meta, indent=2) + "\n"
    except TypeError as e:
        raise HistofmError(f"CLIP overrides must be plain JSON values to be saved ({e}).") from None
    with atomic_path(out / META) as tmp:
        tmp.write_text(text)
    return out / WEIGHTS


def load_clip(path: str | Path) -> tuple[CLIP, int]:
    """Rebuild a CLIP saved by :func:`save_clip` (``path``: its folder or either file); returns ``(method, img_size)``."""
    from histofm.methods.registry import build_method
    from histofm.models.convert import load_checkpoint

    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    meta_path = folder / META
    if not meta_path.is_file():
        raise HistofmError(
            f"No {META} in {folder}; --model clip needs a folder written by histofm.methods.clip_io.save_clip."
        )
    meta = json.loads(meta_path.read_text())
    method, _ = build_method("clip", meta["arch"], img_size=int(meta["img_size"]), overrides=meta["overrides"])
    load_checkpoint(method, folder / WEIGHTS, strict=True)
    return method.eval(), int(meta["img_size"])
