"""Read checkpoints safely and convert foreign layouts to histofm/timm names.

Loading never executes code from the file: ``.safetensors`` through safetensors,
anything else through ``torch.load(weights_only=True)``.

Layouts understood here (model-specific ones live beside their zoo entry):

* timm ``VisionTransformer`` (the names our ViT uses);
* official DINOv2 (``register_tokens``, ``mask_token``, SwiGLU ``w12``/``w3``,
  chunked ``blocks.C.N``), with the class-token position folded into ``cls_token``
  for models whose position table covers patches only (``no_embed_class``);
* wrappers: ``{"model": ...}``, ``{"state_dict": ...}``, ``{"teacher": ...}`` and
  prefixes ``module.``, ``_orig_mod.``, ``backbone.``, ``model.``, ``encoder.``.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.layers import resample_abs_pos_embed

StateDict = dict[str, torch.Tensor]
FilterFn = Callable[[StateDict, nn.Module], StateDict]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth")
_WRAPPER_KEYS = ("model", "state_dict", "teacher", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.")


def _find_in_directory(path: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.pth"))
    if not found:
        raise HistofmError(f"No weights file (.safetensors, .bin, .pth) in directory {path}.")
    return found[0]


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> StateDict:
    """Read a flat ``name -> tensor`` dict from a file or a snapshot directory.

    With ``dtype``, floating-point tensors are cast as they are read, a group of
    about 256 MiB at a time whose file mapping is released before the next, so a
    bfloat16 load of an fp32 file peaks near half the file size instead of 1.5x.
    """
    path = Path(path)
    if not path.exists():
        raise HistofmError(f"Checkpoint {path} does not exist.")
    if path.is_dir():
        path = _find_in_directory(path)
    if dtype is not None and (path.suffix == ".safetensors" or _is_zip(path)):
        return _read_cast(path, dtype)
    sd = _read_all(path)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def _read_all(path: Path) -> StateDict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except HistofmError:
        raise
    except Exception as e:
        kind = _not_a_checkpoint(path)
        if kind is not None:
            raise HistofmError(
                f"Checkpoint {path} is {kind}, not a checkpoint; give a .safetensors, .bin or .pth weights file."
            ) from None
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise HistofmError(
                f"Checkpoint {path} contains Python objects that would run code on load; refusing it "
                "(re-save it as a plain state dict or as .safetensors)."
            ) from None
        raise HistofmError(f"Checkpoint {path} is unreadable or truncated ({type(e).__name__}).") from None
    return _unwrap(sd, path)


_FILE_KINDS = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"), (b"II+\x00", "a TIFF image"), (b"\x89HDF", "an HDF5 file"),
    (b"%PDF", "a PDF document"), (b"GIF8", "a GIF image"), (b"\x1f\x8b", "a gzip archive"),
)


def _not_a_checkpoint(path: Path) -> str | None:
    """What ``path`` is when it is plainly no checkpoint (an image, text ...); ``None`` when it could be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch zip archive or a raw pickle: a checkpoint
        return None
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 2**32:
        return None  # safetensors: 8-byte header length, then the JSON header (perhaps a truncated file)
    for magic, kind in _FILE_KINDS:
        if head.startswith(magic):
            return kind
    if head.startswith(b"{"):
        return "a JSON file" if path.suffix != ".safetensors" else None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file" if b"\x00" not in head else None


_CAST_GROUP_BYTES = 256 * 2**20


def _read_cast(path: Path, dtype: torch.dtype) -> StateDict:
    """:func:`read_state_dict` with a cast, reading (memory-mapped) in groups of tensors.

    Each group's file mapping is dropped before the next group is touched: the mapped
    fp32 pages count as resident memory while mapped, so reading everything at once and
    then casting holds the whole file and the cast copy together.
    """

    def cast(t: torch.Tensor) -> torch.Tensor:
        # a copy in every case: a tensor kept as it is would keep the whole mapping alive
        return t.to(dtype, copy=True) if t.is_floating_point() else t.clone()

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                sizes = {k: math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys()}  # for grouping only
            out: StateDict = {}
            for group in _groups(sizes):
                with safe_open(str(path), framework="pt") as f:
                    for k in group:
                        out[k] = cast(f.get_tensor(k))
        except Exception as e:
            raise HistofmError(f"Checkpoint {path} is unreadable or truncated ({type(e).__name__}).") from None
        return _unwrap(out, path)
    sd = _read_all(path)
    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    del sd
    out = {}
    for group in _groups(sizes):
        sd = _read_all(path)  # memory-mapped again: nothing is read until touched
        for k in group:
            out[k] = cast(sd[k])
        del sd
    return out


def _groups(sizes: dict[str, int]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    total = 0
    for k, n in sizes.items():
        if groups[-1] and total + n > _CAST_GROUP_BYTES:
            groups.append([])
            total = 0
        groups[-1].append(k)
        total += n
    return groups


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _unwrap(obj: object, path: Path) -> StateDict:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HistofmError(f"Checkpoint {path} does not hold a state dict of tensors.")
    return dict(obj)


def strip_prefixes(sd: StateDict, model_keys: set[str]) -> StateDict:
    """Remove wrapper prefixes (``module.``, ``backbone.`` ...) that the model's own names lack."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in model_keys):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def convert_dinov2(sd: StateDict, model: nn.Module) -> StateDict:
    """Map official DINOv2 names to ours (no-op on timm-layout dicts)."""
    out: StateDict = {}
    for k, v in sd.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # FSDP block chunks
        k = k.replace("register_tokens", "reg_token")
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    return out


def adapt_vit_state_dict(sd: StateDict, model: nn.Module) -> StateDict:
    """Fit position tables and optional tokens of a ViT checkpoint to ``model``."""
    own = dict(model.state_dict())
    for extra in ("mask_token", "head.weight", "head.bias"):
        if extra in sd and extra not in own:
            sd.pop(extra)
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        pos = sd["pos_embed"]
        n_prefix = int(getattr(model, "num_prefix_tokens", 1))
        no_embed_class = bool(getattr(model, "no_embed_class", False))
        n_ckpt = pos.shape[1]
        ckpt_prefix = 0
        for p in (0, 1, n_prefix):  # how many rows of the table belong to prefix tokens
            if n_ckpt - p > 0 and math.isqrt(n_ckpt - p) ** 2 == n_ckpt - p:
                ckpt_prefix = p
                break
        if no_embed_class and ckpt_prefix == 1 and "cls_token" in sd:
            # DINOv2 register models: the class token's position is folded into the token.
            sd["cls_token"] = sd["cls_token"] + pos[:, :1]
            pos, ckpt_prefix = pos[:, 1:], 0
        side = math.isqrt(pos.shape[1] - ckpt_prefix)
        grid = model.patch_embed.grid_size  # type: ignore[union-attr]
        pos = resample_abs_pos_embed(pos, grid, (side, side), num_prefix_tokens=ckpt_prefix)
        sd["pos_embed"] = pos
    return sd


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    filter_fn: FilterFn | None = None,
    strict: bool = True,
    assign: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a checkpoint file or directory into ``model`` (in place) and return it.

    On any mismatch, one :class:`HistofmError` lists missing, unexpected and
    wrongly-shaped keys. With ``assign=True`` the checkpoint's tensors become the
    parameters (used with meta-device models so weights are never held twice).
    """
    path = Path(path)
    sd = read_state_dict(path, dtype)  # cast while reading: the fp32 file is never held whole beside the copy
    own = model.state_dict()
    sd = strip_prefixes(sd, set(own))
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    else:
        sd = convert_dinov2(sd, model)
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        sd = adapt_vit_state_dict(sd, model)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if (strict and (missing or unexpected)) or wrong:
        raise HistofmError(_mismatch_message(path, missing, unexpected, wrong, own, sd))
    if dtype is not None:  # tensors made by the conversions above
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=strict, assign=assign)
    return model


def _mismatch_message(
    path: Path, missing: list[str], unexpected: list[str], wrong: list[str], own: StateDict, sd: StateDict
) -> str:
    def head(keys: list[str]) -> str:
        shown = ", ".join(keys[:6])
        return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys ({head(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys ({head(unexpected)})")
    if wrong:
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:4]]
        parts.append(f"{len(wrong)} shape mismatches ({'; '.join(shapes)})")
    return f"Checkpoint {path} does not fit this model: " + "; ".join(parts) + " - is it a checkpoint of another model?"
