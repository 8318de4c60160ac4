"""``histofm pretrain``: self-supervised pretraining of a backbone with any registered method.

    histofm pretrain --method simclr --model vit_small_patch16_224 --data bundled \\
        --steps 1000 --batch-size 64 --out runs/simclr [--config run.yaml] [--resume] \\
        [--img-size 224] [--set lr=1e-3 --set temperature=0.2 --set backbone.depth=6]

On several GPUs or machines, launch the same command with ``torchrun`` (no other launcher)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m histofm pretrain --method dinov2 --model vit_large_patch14_reg4_dinov2 --data slides/ \\
        --batch-size 1024 --precision bf16 --parallel fsdp --compile --out runs/dinov2_l

Settings are merged in this order (later wins): defaults, the YAML ``--config``,
the explicit flags, then ``--set key=value`` pairs. A YAML file may hold::

    method: simclr
    model: vit_small_patch16_224   # the backbone (the old key 'arch' still works)
    data: bundled            # a folder of images, slide files, image,caption CSV (CLIP), or "bundled"
    img_size: 224
    train: {steps: 2000, batch_size: 128, lr: 0.001, precision: bf16}   # TrainConfig fields
    method_args: {temperature: 0.2, view: {hed_p: 0.5}}                  # the method's config fields
    backbone: {depth: 6, drop_path_rate: 0.1}                            # create_model arguments

Flags without a default here take theirs from ``--config`` or from the values shown in
their help. A ``--set`` key that names a :class:`~histofm.train.TrainConfig` field (or starts with
``train.``) goes to the engine, ``backbone.<arg>`` to the backbone, anything else to the
method's config; dotted keys nest (``view.hed_p=0.5``). Values are parsed as YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from histofm.checks import check_out_dir
from histofm.commands._common import add_command
from histofm.commands._vocab import add_deprecated_alias, split_set
from histofm.errors import HistofmError
from histofm.settings import parse_value

_TOP_KEYS = {"method", "model", "data", "img_size", "tile_size", "target_mpp", "mpp_override", "out", "train",
             "method_args", "backbone"}
# TrainConfig fields that have their own flag: errors about them name the flag.
_FLAG_OF = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "precision": "--precision",
            "device": "--device", "num_workers": "--workers", "seed": "--seed", "parallel": "--parallel"}
# Old spellings of settings, kept working with a notice: {old: new}.
_RENAMED_KEYS = {"arch": "model"}


def register(sub: argparse._SubParsersAction) -> None:
    from histofm.methods.registry import list_methods
    from histofm.train.config import TrainConfig

    engine = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def default(field: str) -> str:  # these flags default to None so that --config can set them
        return f"(default: {engine[field]}, unless --config sets it)"

    p = add_command(
        sub, "pretrain", help="self-supervised pretraining (SimCLR, MoCo, CLIP, DINO, DINOv2, MAE, ...)",
        description=__doc__,
        example="histofm pretrain --method simclr --model vit_small_patch16_224 --data bundled --steps 1000 "
                "--out runs/simclr\nhistofm pretrain --config run.yaml --set lr=1e-3 --set backbone.depth=6",
    )
    p.add_argument("--method", help=f"one of: {', '.join(list_methods())}")
    p.add_argument("--model", help="backbone (tile encoder) from `histofm models`, e.g. vit_small_patch16_224")
    add_deprecated_alias(p, "--arch", "--model")
    p.add_argument("--data", help="folder of images, slide file(s) folder, shard folder (histofm shard), image,caption CSV, or 'bundled'")
    p.add_argument("--steps", type=int, help=f"optimiser steps {default('steps')}")
    p.add_argument("--batch-size", type=int, help=f"global batch size {default('batch_size')}")
    p.add_argument("--out", help="output directory (checkpoints, log.jsonl, loss_curve.png, backbone.safetensors)")
    p.add_argument("--config", help="YAML file with the run's settings")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--img-size", type=int, help="training image size (default: 224, unless --config sets it)")
    p.add_argument("--tile-size", type=int, help="tile side read from slides / bundled samples (the image size "
                                                 "unless set)")
    p.add_argument("--target-mpp", type=float,
                   help="microns per pixel of slide tiles (default: 0.5, unless --config sets it)")
    p.add_argument("--mpp-override", type=float,
                   help="level-0 microns per pixel of slides whose files record none (all slides in --data)")
    p.add_argument("--lr", type=float, help=f"peak learning rate {default('lr')}")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help=f"mixed precision {default('precision')}")
    p.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help=f"under torchrun: ddp (replicas) or fsdp (FSDP2 sharding, for ViT-L and larger) {default('parallel')}")
    p.add_argument("--compile", action="store_true", help="torch.compile each Transformer block")
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:N, mps {default('device')}")
    p.add_argument("--workers", type=int, help=f"data-loading worker processes {default('num_workers')}")
    p.add_argument("--seed", type=int, help=f"random seed {default('seed')}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--check", action="store_true", help="check the settings and exit (nothing is read or written)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting (repeatable): TrainConfig field, method option, or backbone.<arg>",
    )
    p.set_defaults(func=run)


def _load_yaml(path: str) -> dict[str, Any]:
    from histofm.settings import load_config_file

    return load_config_file(path)  # binary, non-UTF-8 or non-mapping files: one sentence


def _nest(d: dict[str, Any], dotted: str, value: Any) -> None:  # noqa: ANN401
    *parents, leaf = dotted.split(".")
    for key in parents:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise HistofmError(f"Cannot set {dotted}: {key} is not a group of settings.")
    d[leaf] = value


def _renamed(key: str, where: str) -> str:
    """The current name of a setting; an old one is accepted with a one-line notice."""
    if key in _RENAMED_KEYS:
        new = _RENAMED_KEYS[key]
        print(f"histofm: note: '{key}' in {where} is deprecated; use '{new}' (same meaning).", file=sys.stderr)
        return new
    return key


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Merge defaults, YAML, flags and ``--set`` into ``{method, model, data, ..., train, method_args, backbone}``."""
    from histofm.train import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    s: dict[str, Any] = {"img_size": 224, "target_mpp": 0.5, "train": {}, "method_args": {}, "backbone": {}}
    if args.config:
        for k, v in _load_yaml(args.config).items():
            k = _renamed(k, args.config)
            if k in ("train", "method_args", "backbone"):
                if not isinstance(v, dict):
                    raise HistofmError(f"'{k}' in {args.config} must be a mapping.")
                s[k].update(v)
            elif k in _TOP_KEYS:
                s[k] = v
            elif k in train_fields:
                s["train"][k] = v
            else:
                s["method_args"][k] = v
    flags = {"method": args.method, "model": args.model, "data": args.data, "out": args.out,
             "img_size": args.img_size, "tile_size": args.tile_size, "target_mpp": args.target_mpp,
             "mpp_override": args.mpp_override}
    s.update({k: v for k, v in flags.items() if v is not None})
    train_flags = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "precision": args.precision,
                   "device": args.device, "num_workers": args.workers, "seed": args.seed,
                   "parallel": args.parallel, "compile": True if args.compile else None}
    s["train"].update({k: v for k, v in train_flags.items() if v is not None})
    if args.resume:
        s["train"]["resume"] = True
    if args.no_progress:
        s["train"]["progress"] = False
    for key, raw in split_set(args.set).items():  # the one KEY=VALUE splitter; values read as below
        key = _renamed(key, "--set")
        value = parse_value(raw)
        if key.startswith("train."):
            _nest(s["train"], key[len("train."):], value)
        elif key in train_fields:
            s["train"][key] = value
        elif key.startswith("backbone."):
            _nest(s["backbone"], key[len("backbone."):], value)
        elif key in _TOP_KEYS - {"train", "method_args", "backbone"}:
            s[key] = value
        else:
            _nest(s["method_args"], key, value)
    for key in ("method", "model", "data", "out"):
        if not s.get(key):
            raise HistofmError(f"Missing --{key} (or '{key}:' in the --config file).")
    check_out_dir(s["out"])
    s["train"]["out_dir"] = str(s["out"])
    return s


def run(args: argparse.Namespace) -> int:
    from histofm.commands._settings import check_pretrain_settings
    from histofm.data.datasets import tile_dataset
    from histofm.methods.registry import build_method
    from histofm.train import TrainConfig, fit
    from histofm.utils import seed_everything
    from histofm.utils.distributed import is_main

    s = check_pretrain_settings(resolve_settings(args), args)  # every value checked before any work
    if args.check:
        return _print_checked(s)
    try:
        cfg = TrainConfig.from_dict(s["train"])
    except HistofmError as e:
        raise HistofmError(_in_flags(str(e))) from None
    seed_everything(cfg.seed)  # the initial weights too: the same --seed gives the same run
    overrides = dict(s["method_args"])
    if s["backbone"]:
        overrides["backbone"] = dict(s["backbone"])
    img_size = int(s["img_size"])
    try:
        method, transform = build_method(s["method"], s["model"], img_size=img_size, overrides=overrides)
    except HistofmError as e:
        raise HistofmError(_in_flags(str(e))) from None
    mpp = s.get("mpp_override")
    dataset = tile_dataset(s["data"], tile_size=int(s.get("tile_size") or img_size), target_mpp=float(s["target_mpp"]),
                           mpp=float(mpp) if mpp is not None else None)
    if is_main():
        print(f"histofm pretrain: {s['method']} on {s['model']} ({sum(p.numel() for p in method.backbone.parameters()) / 1e6:.2f}M "
              f"backbone parameters), {len(dataset)} samples from {s['data']}, {cfg.steps} steps of {cfg.batch_size}.")
    if is_main() and cfg.out_dir and hasattr(method, "attach_reconstructions"):
        _attach_reconstructions(method, dataset, transform, Path(cfg.out_dir) / "reconstructions", cfg.steps)
    history = fit(method, dataset, cfg, transform=transform, run_info=_run_info(s, len(dataset)))
    if is_main() and history:
        from histofm.train.loop import skipped_steps

        out = Path(cfg.out_dir or ".")
        last = [h["loss"] for h in history[-10:] if h["loss"] == h["loss"]]
        skipped = skipped_steps(history)
        note = f"; {skipped} of {len(history)} steps skipped for a non-finite loss or gradient" if skipped else ""
        print(f"final loss {sum(last) / max(len(last), 1):.4f} (mean of the last {len(last)} steps){note}")
        print(f"backbone: {out / 'backbone.safetensors'} (load: histofm.train.load_backbone({str(out)!r}))")
        print(f"log: {out / 'log.jsonl'}, curve: {out / 'loss_curve.png'}")
    _leave_process_group()
    return 0


def _run_info(s: dict[str, Any], n_samples: int) -> dict[str, Any]:
    """The settings a resume must keep (the engine refuses another value, naming the flag): method,
    model, image and tile size, and the data, as its resolved path and number of samples (last: the
    tile size and the microns per pixel change the count, and are the cause to name)."""
    data = str(s["data"])
    where = data if data == "bundled" else str(Path(data).resolve())
    return {"--method": str(s["method"]), "--model": str(s["model"]), "--img-size": int(s["img_size"]),
            "--tile-size": int(s.get("tile_size") or s["img_size"]), "--target-mpp": float(s["target_mpp"]),
            "--data": f"{where} ({n_samples} samples)"}


def _leave_process_group() -> None:
    """Under ``torchrun``: wait for every rank, then tear the group down before the interpreter exits
    (left to interpreter shutdown, gloo's threads can abort a rank with SIGABRT after a finished run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _in_flags(message: str) -> str:
    """An engine or method-config error restated in this command's words (the flag or ``--set KEY``)."""
    if message.startswith("Unknown option(s) "):
        return "Unknown --set key(s) " + message[len("Unknown option(s) "):]
    head, _, rest = message.partition(" ")
    if head == "Option":  # "Option lr expects a float, got 'fast'."
        head, _, rest = rest.partition(" ")
    if head in _FLAG_OF:
        return f"{_FLAG_OF[head]} {rest}"
    if message.startswith("Option ") or head in _train_fields():  # a key set with --set or in --config
        return f"The setting {head} (--set or --config) {rest}"
    return message


def _train_fields() -> set[str]:
    from histofm.train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def _print_checked(s: dict[str, Any]) -> int:
    print(f"histofm pretrain: settings OK ({s['method']}, {s.get('model') or s.get('arch')}); nothing was run.")
    return 0


def _attach_reconstructions(method: Any, dataset: Any, transform: Any, out: Path, steps: int) -> None:  # noqa: ANN401
    """Masked-image methods (MAE, PLUTO): save reconstructions of 8 fixed tiles during training."""
    import torch

    images = []
    preview = dataset.preview(8) if hasattr(dataset, "preview") else None  # a stream (shards) has no dataset[i]
    for i in range(min(8, len(dataset))):
        item = preview[i] if preview is not None else dataset[i]
        item = item[0] if isinstance(item, tuple) else item
        view = transform(item) if transform is not None else item
        while isinstance(view, (list, tuple)):  # multi-crop: the first global crop
            view = view[0]
        if not isinstance(view, torch.Tensor):
            return  # a view this picture helper does not know how to show
        images.append(view)
    if images:
        method.attach_reconstructions(torch.stack(images), out, every=max(steps // 5, 1))
