"""Check a command's merged settings before any model is built or file is read.

``histofm pretrain`` merges defaults, ``--config``, flags and ``--set`` into one dict
(``resolve_settings``); :func:`check_pretrain_settings` then checks every value
against its one declaration (:mod:`histofm.settings`: ``TrainConfig``, the method's
config, the backbone's arguments) and restates a bad one with where it came from::

    --set temperature=0: temperature must be > 0, got 0.

:func:`check_semi_args` does the same for ``histofm semi``'s flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from histofm.checks import check_device, check_out_dir
from histofm.errors import HistofmError
from histofm.settings import SettingError, coerce_fields, setting, shown

# Flags of `histofm pretrain` that set a TrainConfig field or a top-level setting.
_TRAIN_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "precision": "--precision",
                "device": "--device", "num_workers": "--workers", "seed": "--seed", "parallel": "--parallel"}
_TOP_FLAGS = {"method": "--method", "arch": "--arch", "model": "--model", "data": "--data",
              "img_size": "--img-size", "tile_size": "--tile-size", "target_mpp": "--target-mpp",
              "mpp_override": "--mpp-override"}
_TOP_KEYS = {"method", "arch", "model", "data", "img_size", "tile_size", "target_mpp", "mpp_override", "out"}


@dataclasses.dataclass(frozen=True)
class TopSettings:
    """The top-level settings of ``histofm pretrain`` (besides method, model, data and out)."""

    img_size: int = setting(224, range="[8, 8192]")
    tile_size: int | None = setting(None, range="[8, 65536]")
    target_mpp: float = setting(0.5, range="(0, 1000]")
    mpp_override: float | None = setting(None, range="(0, 1000]")


# --------------------------------------------------------------------------- where a value came from
def _set_path(key: str, train_fields: set[str]) -> str:
    """The merged-settings path a ``--set`` key lands on (the rule of ``resolve_settings``)."""
    if key.startswith(("train.", "backbone.")):
        return key
    if key in train_fields:
        return f"train.{key}"
    if key in _TOP_KEYS:
        return key
    return f"method_args.{key}"


def origin(path: str, args: argparse.Namespace) -> str:
    """Where the value at ``path`` (``train.lr``, ``method_args.view.hed_p``) came from, as the user typed it."""
    from histofm.train.config import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in reversed(getattr(args, "set", None) or []):
        key = item.partition("=")[0].strip()
        p = _set_path(key, train_fields)
        if path == p or path.startswith(p + ".") or p.startswith(path + "."):
            return f"--set {shown(item)}"
    leaf = path.split(".", 1)[1] if path.startswith("train.") else path
    flag = _TRAIN_FLAGS.get(leaf) if path.startswith("train.") else _TOP_FLAGS.get(path)
    if flag is not None and getattr(args, flag[2:].replace("-", "_"), None) is not None:
        value = getattr(args, flag[2:].replace("-", "_"))
        return f"{flag} {shown(value)}"
    if getattr(args, "config", None):
        return f"--config {shown(args.config)}"
    return ""


def _at(path: str, args: argparse.Namespace) -> str:
    """``"--set key=value: "`` (where the value at ``path`` came from), or nothing when it is a default."""
    where = origin(path, args)
    return f"{where}: " if where else ""


def _restate(e: SettingError, path_prefix: str, args: argparse.Namespace) -> HistofmError:
    where = origin(path_prefix + e.key, args)
    return HistofmError(f"{where}: {e}" if where else str(e))


# --------------------------------------------------------------------------- checks
def _memory_bytes(device: str = "cpu") -> int | None:
    """Memory of ``device`` (a CUDA GPU's own, else this machine's RAM)."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index or 0
            return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_memory(batch_size: int, img_size: int, what: str) -> None:
    """One float32 view of the batch must fit in a quarter of this machine's memory."""
    need = batch_size * 3 * img_size * img_size * 4
    have = _memory_bytes()
    if have is not None and need > have / 4:
        raise HistofmError(f"{what} needs {need / 2**30:.1f} GiB for one view of one batch, more than a quarter of "
                           f"this machine's {have / 2**30:.1f} GiB; lower the batch size or the image size.")


def check_pretrain_settings(s: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Check ``resolve_settings``'s merged dict in place of any work; returns it with values coerced.

    Raises:
        HistofmError: one sentence naming where the bad value came from and what it must be.
    """
    from histofm.methods.backbone_settings import activation_bytes, check_backbone_overrides
    from histofm.methods.registry import list_methods, method_config, method_config_class, method_presets
    from histofm.registry import list_models
    from histofm.train.config import TrainConfig

    model_key = "model" if "model" in s else "arch"
    if s.get("method") not in list_methods():
        raise HistofmError(f"{_at('method', args)}Unknown method {s.get('method')!r}; "
                           f"choose one of {', '.join(list_methods())}.")
    if not isinstance(s.get(model_key), str) or s[model_key] not in list_models():
        raise HistofmError(f"{_at(model_key, args)}Unknown model {s.get(model_key)!r}; "
                           "run `histofm models` to list them.")
    if not isinstance(s.get("data"), str):
        raise HistofmError(f"{_at('data', args)}data must be a path or 'bundled', got {s.get('data')!r}.")
    top = {k: s[k] for k in ("img_size", "tile_size", "target_mpp", "mpp_override") if s.get(k) is not None}
    try:
        s.update(coerce_fields(TopSettings, top))
        cfg = TrainConfig.from_dict(s["train"])
    except SettingError as e:
        raise _restate(e, "" if e.key in top else "train.", args) from None
    check_device(cfg.device, origin("train.device", args).split(" ")[0] or "--device", allow_auto=True)
    check_out_dir(str(s["out"]), "--out")
    check_batch_memory(cfg.batch_size, int(s["img_size"]), f"--batch-size {cfg.batch_size} at --img-size {s['img_size']}")
    if s.get("tile_size"):
        check_batch_memory(1, int(s["tile_size"]), f"--tile-size {s['tile_size']}")

    method_args = dict(s["method_args"])
    preset = method_args.pop("preset", None)
    if preset is not None and preset not in method_presets(s["method"]):
        choices = ", ".join(method_presets(s["method"])) or "none"
        raise HistofmError(f"{_at('method_args.preset', args)}unknown preset {preset!r} for {s['method']}; "
                           f"choose one of: {choices}.")
    backbone = dict(s["backbone"])
    cls = method_config_class(s["method"])
    try:
        fixed = coerce_fields(cls, method_args)
        method_config(s["method"], {**fixed, **({"preset": preset} if preset is not None else {})})  # cross-field rules
    except SettingError as e:
        raise _restate(e, "method_args.", args) from None
    nested = fixed.get("backbone_kwargs") or {}
    try:
        _, probe = check_backbone_overrides(s[model_key], {**nested, **backbone})
    except SettingError as e:
        raise _restate(e, "", args) from None
    _check_patch_multiples(s, fixed, probe, args)
    # Activations of one rank's share of the batch; refused only when they could not fit twice over.
    per_rank = max(cfg.batch_size // max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1), 1)
    need = activation_bytes(probe, per_rank, int(s["img_size"]))
    have = _memory_bytes(cfg.device)
    if need is not None:
        need //= (12 if cfg.grad_checkpointing else 1) * (2 if cfg.precision != "fp32" else 1)
    if need is not None and have is not None and need > 2 * have:
        raise HistofmError(f"--batch-size {cfg.batch_size} at --img-size {s['img_size']} on {s[model_key]} needs about "
                           f"{need / 2**30:.0f} GiB of activations per step, more than the {have / 2**30:.0f} GiB here; "
                           "lower the batch size or the image size.")
    return s


def _check_patch_multiples(s: dict[str, Any], method_args: dict[str, Any], probe: Any, args: argparse.Namespace) -> None:  # noqa: ANN401
    """Image and crop sides must be whole numbers of the backbone's patches (else a traceback at the first step)."""
    patch = getattr(probe, "patch_size", None)
    if not isinstance(patch, int) or patch < 2 or s["method"] == "pluto":  # PLUTO draws its patch size per step
        return
    sides = [("img_size", "img_size", s["img_size"])]
    for group, keys in (("view", ("size",)), ("view2", ("size",)), ("augment", ("global_size", "local_size"))):
        sub = method_args.get(group)
        if isinstance(sub, dict):
            sides += [(f"method_args.{group}.{k}", f"{group}.{k}", sub[k]) for k in keys if k in sub]
    if method_args.get("local_size"):
        sides.append(("method_args.local_size", "local_size", method_args["local_size"]))
    for path, name, side in sides:
        if int(side) % patch:
            raise HistofmError(f"{_at(path, args)}{name}={side} is not a multiple of the backbone's "
                               f"patch size {patch}; use a multiple such as {max(patch, int(side) // patch * patch)}.")


# --------------------------------------------------------------------------- semi
@dataclasses.dataclass(frozen=True)
class SemiInputs:
    """``histofm semi``'s numeric flags, declared once (the engine's settings are checked again by it)."""

    width: int = setting(32, range="[1, 1024]")
    img_size: int = setting(32, range="[8, 4096]")
    threshold: float | None = setting(None, range="[0, 1]")
    steps: int = setting(500, range=">= 1")
    batch_size: int = setting(32, range="[1, 65536]")
    mu: int = setting(4, range="[1, 1024]")
    lr: float = setting(0.03, range="> 0")
    seed: int = setting(0, range="[0, 4294967295]")
    ckpt_every: int = setting(100, range=">= 0")


def check_semi_args(args: argparse.Namespace) -> None:
    """Check ``histofm semi``'s flags before any file is read or model built.

    Raises:
        HistofmError: ``--FLAG VALUE: why``.
    """
    def flag_error(e: SettingError) -> HistofmError:
        name = e.key.split(".")[0]
        return HistofmError(f"--{name.replace('_', '-')} {getattr(args, name, '')}: {e}")

    try:
        coerce_fields(SemiInputs, {k: getattr(args, k) for k in ("width", "img_size", "threshold", "steps",
                                                                 "batch_size", "mu", "lr", "seed", "ckpt_every")})
    except SettingError as e:
        raise flag_error(e) from None
    check_device(args.device)
    check_out_dir(args.out)
    for flag, path, what in (("--data", args.data, "Image folder"), ("--labels", args.labels, "Labels file"),
                             ("--test-labels", args.test_labels, "Labels file")):
        if path is not None and not (path.is_dir() if flag == "--data" else path.is_file()):
            raise HistofmError(f"{what} not found: {shown(path)}; check {flag}.")
    check_batch_memory(args.batch_size * (1 + 2 * args.mu), args.img_size,
                       f"--batch-size {args.batch_size} with --mu {args.mu} at --img-size {args.img_size}")


# --------------------------------------------------------------------------- eval nuclei
@dataclasses.dataclass(frozen=True)
class EvalNucleiOptions:
    """``histofm eval nuclei``'s numeric flags, declared once."""

    crop: int = setting(48, range="[8, 1024]")
    seed: int = setting(0, range="[0, 4294967295]")
    seeds: int = setting(3, range="[1, 1000]")
    linear_c: float | None = setting(None, range="> 0")
    shots: int = setting(10, range="[1, 10000]")
    episodes: int = setting(100, range="[1, 1000000]")
    bootstrap: int = setting(500, range="[0, 1000000]")


def check_json_path(path: str | os.PathLike[str] | None, flag: str = "--json") -> None:
    """``path`` can be written as a file (checked before the work whose result it receives)."""
    from pathlib import Path

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise HistofmError(f"{flag} {p} is a folder; give a file name such as {p / 'results.json'}.")
    check_out_dir(p.parent, flag)


def check_model_overrides(model: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A tile encoder's ``--set`` constructor overrides, coerced and checked by building it on the ``meta``
    device (no memory), so a bad value ends in one sentence before any work, not in a traceback."""
    from histofm.methods.backbone_settings import check_backbone_overrides

    if not overrides:
        return overrides
    try:
        fixed, _ = check_backbone_overrides(model, overrides, prefix="")
    except SettingError as e:
        raise HistofmError(f"--set {e.key}={shown(overrides.get(e.key, ''))}: {e}") from None
    return fixed


def check_eval_nuclei_args(args: argparse.Namespace) -> None:
    """Check ``histofm eval nuclei``'s flags before any model is built or file read.

    Raises:
        HistofmError: ``--FLAG VALUE: why``.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalNucleiOptions) if hasattr(args, f.name)}
    try:
        coerce_fields(EvalNucleiOptions, values)
    except SettingError as e:
        raise HistofmError(f"--{e.key.replace('_', '-')} {values.get(e.key)}: {e}") from None
    check_device(args.device)
    check_json_path(getattr(args, "json", None))
