"""``histofm segment``: nucleus instance segmentation of images and slides.

    histofm segment --model vit_tiny_patch8_224 --checkpoint cells.safetensors field.png slide.svs --out nuclei/

The input is read at level 0 in chunks (``--chunk`` px plus a context margin), each chunk
in overlapping tiles (``--tile``, ``--overlap``) whose maps are blended; a nucleus
belongs to the chunk that holds its centroid. For each input ``<stem>`` it writes, in
``--out/<stem>/``: the instance mask (``mask.tiff``, ``.png`` or ``.npz``), ``nuclei.csv``
(id, centroid, area, type, probability), ``nuclei.geojson`` (QuPath detections, level-0
pixels), ``overlay.png`` (outlines on the image, downsized) and ``summary.json``.

The checkpoint is what :func:`histofm.cells.train.save_cell_model` saves (the
benchmark ``benchmarks/cells_hgsc.py`` writes one). ``--random-init`` runs an untrained
model (to try the pipeline; the nuclei are meaningless). ``--set`` changes the
post-processing (``threshold``, ``marker_threshold``, ``ksize``, ``min_size``) and, with
``--random-init``, the encoder (``backbone.depth=2``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

from histofm.commands._common import add_command

MASK_FORMATS = ("tiff", "png", "npz")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "segment", help="segment nuclei (instances, types) in images and slides",
        example="histofm segment --model vit_tiny_patch8_224 --checkpoint cells.safetensors field.png --out nuclei/",
        description=__doc__,
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="images (.png, .jpg, .tif) or slides")
    p.add_argument("--model", required=True, help="the tile encoder of the cell model (histofm models)")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--checkpoint", type=Path, help="cell model saved by histofm's cell training (.safetensors)")
    w.add_argument("--random-init", action="store_true", help="untrained model, to try the pipeline")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--tile", type=int, default=None, help="network tile in px (None: the model's training crop)")
    p.add_argument("--overlap", type=int, default=None, help="overlap of neighbouring tiles in px (None: a quarter tile)")
    p.add_argument("--chunk", type=int, default=1024, help="post-processing chunk side in level-0 px")
    p.add_argument("--margin", type=int, default=64, help="context around each chunk in px")
    p.add_argument("--mask-format", choices=MASK_FORMATS, default="tiff", help="file type of the instance mask")
    p.add_argument("--mpp-override", type=float, help="level-0 microns per pixel to record (replaces the file's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="post-processing setting, or backbone.KEY=VALUE with --random-init (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _parse_sets(items: list[str], random_init: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    import yaml

    from histofm.cells.postprocess import PostprocessConfig
    from histofm.errors import HistofmError

    post_keys = {f.name for f in dataclasses.fields(PostprocessConfig)}
    post, backbone = {}, {}
    for item in items:
        if "=" not in item:
            raise HistofmError(f"--set expects KEY=VALUE, got {item!r}.")
        key, raw = (s.strip() for s in item.split("=", 1))
        value = yaml.safe_load(raw)
        if key in post_keys:
            post[key] = value
        elif key.startswith("backbone.") and random_init:
            backbone[key[len("backbone."):]] = value
        elif key.startswith("backbone."):
            raise HistofmError(f"--set {key} changes the encoder, which the checkpoint fixes; use it with --random-init.")
        else:
            raise HistofmError(f"Unknown --set key {key!r}; use one of {', '.join(sorted(post_keys))} or backbone.KEY.")
    return post, backbone


def _load_model(args: argparse.Namespace, backbone: dict[str, Any]) -> tuple[Any, Any]:
    import histofm
    from histofm.cells.hovernet import HoVerNetConfig, build_hovernet
    from histofm.cells.train import load_cell_model
    from histofm.errors import HistofmError
    from histofm.utils import seed_everything

    if args.model not in histofm.list_models():
        raise HistofmError(f"Unknown --model {args.model!r}; run `histofm models` for the registered encoders.")
    if args.checkpoint is not None:
        model, cfg = load_cell_model(args.checkpoint)
        if cfg.encoder != args.model:
            raise HistofmError(f"{args.checkpoint.name} was trained on {cfg.encoder!r}, not {args.model!r}; "
                               f"pass --model {cfg.encoder}.")
        return model, cfg
    seed_everything(args.seed)
    cfg = HoVerNetConfig(encoder=args.model, encoder_kwargs=backbone)
    try:
        model = build_hovernet(cfg)
    except (TypeError, ValueError) as e:
        raise HistofmError(f"Cannot build a cell model on {args.model!r} ({e}); choose a ViT with a power-of-two "
                           "patch size or fix the backbone.* --set values.") from None
    return model.eval(), cfg


def run(args: argparse.Namespace) -> int:
    from histofm.cells.postprocess import PostprocessConfig
    from histofm.checks import check_device, check_out_dir, check_range
    from histofm.errors import HistofmError
    from histofm.wsi import open_slide

    check_out_dir(args.out)
    args.device = check_device(args.device)
    post_kw, backbone = _parse_sets(args.set, args.random_init)
    for key, value in post_kw.items():  # numbers in range, before a model is built
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise HistofmError(f"--set {key} needs a number, got {value!r}.")
        integer = key in ("ksize", "min_size")
        if integer and not isinstance(value, int):
            raise HistofmError(f"--set {key} needs a whole number, got {value!r}.")
        if key == "ksize" and (value < 3 or value % 2 == 0):
            raise HistofmError(f"--set ksize must be an odd whole number of at least 3, got {value}.")
        check_range(value, f"--set {key}", low=0, high=1 if "threshold" in key else None, integer=integer)
    for flag, value, low in (("--tile", args.tile, 1), ("--overlap", args.overlap, 0), ("--chunk", args.chunk, 1),
                             ("--margin", args.margin, 0)):
        check_range(value, flag, low=low, integer=True)
    check_range(args.mpp_override, "--mpp-override", low=0, low_open=True)
    post = PostprocessConfig(**post_kw)
    for path in args.inputs:
        if not path.exists():
            raise HistofmError(f"Input not found: {path}; check the path.")
    model, cfg = _load_model(args, backbone)
    tile = args.tile or cfg.tile
    args.overlap = tile // 4 if args.overlap is None else args.overlap
    for path in args.inputs:
        with open_slide(path, mpp=args.mpp_override) as slide:
            _segment_one(slide, path, model, cfg, post, tile, args)
    return 0


def _segment_one(slide: Any, path: Path, model: Any, cfg: Any, post: Any, tile: int, args: argparse.Namespace) -> None:  # noqa: ANN401
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from histofm.cells.geojson import nuclei_features
    from histofm.cells.infer import segment_region
    from histofm.errors import HistofmError
    from histofm.wsi.qupath import write_geojson

    W, H = slide.dimensions
    if W * H > 2**31 - 1:
        raise HistofmError(f"{path.name} has {W} x {H} level-0 pixels, too many for one instance mask; crop the "
                           "region of interest first (for example with vips crop).")
    out = args.out / path.stem
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=args.no_progress)
    with bar:
        task = bar.add_task(f"segmenting {path.name}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def read(x: int, y: int, w: int, h: int) -> Any:  # noqa: ANN401
            return slide.read_region_array((x, y), 0, (w, h))

        nuclei = segment_region(read, (W, H), model, cfg.mean, cfg.std, tile=tile, overlap=args.overlap,
                                chunk=args.chunk, margin=args.margin, post=post, device=args.device, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    mask_path = _write_mask(nuclei.mask, out / f"mask.{args.mask_format}")
    names = cfg.type_names
    _write_csv(nuclei, names, out / "nuclei.csv")
    write_geojson(out / "nuclei.geojson", {"type": "FeatureCollection",
                                           "features": nuclei_features(nuclei.mask, nuclei.type_id, nuclei.probability, names)})
    overlay = _write_overlay(slide, nuclei.mask, out / "overlay.png")
    mpp = slide.mpp if slide.has_mpp else None
    counts = {n: int((nuclei.type_id == i + 1).sum()) for i, n in enumerate(names)}
    summary = {"input": path.name, "size": [W, H], "mpp": mpp, "nuclei": int(len(nuclei.area)), "per_type": counts,
               "model": args.model, "checkpoint": args.checkpoint.name if args.checkpoint else None,
               "random_init": bool(args.random_init), "tile": tile, "overlap": args.overlap,
               "postprocess": dataclasses.asdict(post)}
    from histofm.utils import atomic_path

    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    print(f"{path.name}: {len(nuclei.area)} nuclei ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
          f"mask {mask_path.name}, table, GeoJSON{' and overlay' if overlay else ''} in {out}")


def _write_mask(mask: Any, path: Path) -> Path:  # noqa: ANN401
    import numpy as np

    from histofm.errors import HistofmError
    from histofm.utils import atomic_path

    fmt = path.suffix[1:]
    with atomic_path(path) as tmp:
        if fmt == "npz":
            with open(tmp, "wb") as f:
                np.savez_compressed(f, mask=mask)
        elif fmt == "png":
            if mask.max() > 65535:
                raise HistofmError(f"{int(mask.max())} nuclei do not fit a 16-bit PNG; use --mask-format tiff or npz.")
            from PIL import Image

            Image.fromarray(mask.astype(np.uint16)).save(tmp, format="PNG")
        else:
            import tifffile

            tifffile.imwrite(tmp, mask.astype(np.int32), compression="zlib",
                             tile=(256, 256) if min(mask.shape) >= 256 else None)
    return path


def _write_csv(nuclei: Any, names: tuple[str, ...], path: Path) -> None:  # noqa: ANN401
    from histofm.utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "centroid_x", "centroid_y", "area_px", "type", "type_id", "probability"])
        for i in range(len(nuclei.area)):
            t = int(nuclei.type_id[i])
            w.writerow([i + 1, f"{nuclei.centroid[i, 0]:.2f}", f"{nuclei.centroid[i, 1]:.2f}", int(nuclei.area[i]),
                        names[t - 1], t, f"{nuclei.probability[i]:.4f}"])


def _write_overlay(slide: Any, mask: Any, path: Path, max_side: int = 2048) -> bool:  # noqa: ANN401
    """Nucleus outlines on the image, at most ``max_side`` px; skipped for inputs over 64 M pixels."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from histofm.wsi.tiling import save_png

    H, W = mask.shape
    if W * H > 64_000_000:
        return False
    rgb = slide.read_region_array((0, 0), 0, (W, H)).copy()
    rgb[find_boundaries(mask, mode="inner")] = (0, 255, 0)
    image = Image.fromarray(rgb)
    scale = min(1.0, max_side / max(W, H))
    if scale < 1:
        image = image.resize((max(1, round(W * scale)), max(1, round(H * scale))), Image.Resampling.LANCZOS)
    save_png(image, path)
    return True
