"""``histofm zeroshot``: prompt-ensembled zero-shot tile and slide classification, and text-to-tile retrieval.

Inputs are images, folders of images (each image is one tile) and slides (tiled
with ``histofm.wsi`` and classified by MI-Zero top-K pooling). Writes into ``--out``:
``tiles.csv`` (one row per tile: source, x, y, prediction, probability and logit per class),
``slides.csv`` (slides only), ``retrieval.csv`` and ``retrieval.png`` (with
``--query``) and ``summary.json``. The scoring lives in :mod:`histofm.eval.zeroshot`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histofm.commands._common import add_command
from histofm.errors import HistofmError

if TYPE_CHECKING:
    from histofm.eval.zeroshot import VLEncoder

SETTINGS: dict[str, tuple[type, Any]] = {
    "topk": (int, 10),  # MI-Zero: tiles pooled per slide and class
    "batch_size": (int, 32),
    "target_mpp": (float, 0.5),  # slide tiles
    "tile_size": (int, 0),  # slide tiles; 0: the model's input size
    "min_tissue": (float, 0.5),
    "retrieve": (int, 8),  # tiles listed per --query
    "tokenizer_file": (str, ""),  # models whose vocabulary is not bundled (CONCH)
    "device": (str, "auto"),  # auto: CUDA, then MPS, then CPU
}

EXAMPLE = """\
histofm zeroshot --model quiltnet_b32 --pretrained --classes "tumour,stroma" tiles/ --out zs/
histofm zeroshot --model clip --checkpoint run/ --classes "tumour nest,stroma" --query "stroma" tiles/ --out zs/
histofm zeroshot --model conch --checkpoint conch.bin --set tokenizer_file=conch.json --classes "a,b" slide.svs --out zs/"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "zeroshot", help="zero-shot tile/slide classification and text-to-tile retrieval",
                    example=EXAMPLE)
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="images, folders of images, or slides")
    p.add_argument("--model", required=True,
                   help="a vision-language model (`histofm models`, kind vision-language) or 'clip' (histofm's own)")
    p.add_argument("--classes", default=None, help="comma-separated class names, e.g. \"tumour,stroma,fat\"")
    p.add_argument("--templates", type=Path, default=None,
                   help="text file, one prompt template per line with {} for the class (default: 5 H&E templates)")
    p.add_argument("--query", action="append", default=[], metavar="TEXT", help="text to retrieve tiles for (repeatable)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, default=None,
                         help="weights file or folder (for --model clip: the folder written by save_clip)")
    weights.add_argument("--pretrained", action="store_true", help="download the official weights")
    weights.add_argument("--random-init", action="store_true", help="random weights (a smoke test; scores mean nothing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"settings: {', '.join(f'{k} (default {v[1]!r})' for k, v in SETTINGS.items())}")
    p.add_argument("--mpp-override", type=float, default=None, help="level-0 microns per pixel of the slides")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["topk=5", ...]`` -> settings with defaults; unknown keys and bad values raise one sentence."""
    from histofm.checks import check_device
    from histofm.commands._vocab import split_set

    out = {k: v[1] for k, v in SETTINGS.items()}
    for key, value in split_set(pairs, example="topk=5").items():
        if key not in SETTINGS:
            raise HistofmError(f"Unknown setting {key!r}; --set takes KEY=VALUE with KEY one of {', '.join(SETTINGS)}.")
        kind = SETTINGS[key][0]
        try:
            out[key] = kind(value)
        except ValueError:
            raise HistofmError(f"--set {key} needs a value of type {kind.__name__}, got {value!r}.") from None
    check_device(out["device"], "--set device", allow_auto=True)
    return out


def load_encoder(args: argparse.Namespace, settings: dict[str, Any]) -> VLEncoder:
    """The :class:`~histofm.eval.zeroshot.VLEncoder` named by ``--model`` and its weights flag."""
    import torch

    import histofm
    from histofm.eval.zeroshot import VLEncoder
    from histofm.utils import default_device

    device = default_device() if settings["device"] == "auto" else torch.device(settings["device"])
    if args.model == "clip":
        from histofm.data.augment import eval_view
        from histofm.methods.clip_io import load_clip

        if args.checkpoint is None:  # no official weights exist for histofm's own CLIP
            raise HistofmError(
                "--model clip needs --checkpoint DIR, the folder written by histofm.methods.clip_io.save_clip."
            )
        method, img_size = load_clip(args.checkpoint)
        info = histofm.model_info(method.backbone.histofm_name)
        return VLEncoder("clip", method.to(device), method.tokenizer, eval_view(img_size, info.mean, info.std),
                         img_size, method.cfg.max_logit_scale)
    info = histofm.model_info(args.model)
    if info.kind != "vision-language":
        raise HistofmError(
            f"Model {args.model!r} is a {info.kind} model without a text tower; zeroshot needs a vision-language "
            "model (`histofm models`, kind column) or --model clip."
        )
    if not (args.checkpoint or args.pretrained or args.random_init):
        raise HistofmError("Say which weights to use: --pretrained, --checkpoint PATH or --random-init.")
    tok_kw = {"tokenizer_file": settings["tokenizer_file"]} if settings["tokenizer_file"] else {}
    if info.text.get("tokenizer") == "hf_json" and not tok_kw:
        raise HistofmError(f"Model {args.model!r} needs its own tokenizer file; add --set tokenizer_file=PATH.")
    model = histofm.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint).eval()
    return VLEncoder(args.model, model.to(device), lambda texts: histofm.tokenize(texts, model=args.model, **tok_kw),
                     histofm.eval_transform(args.model), info.input_size[-1])


def collect_inputs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """``(images, slides)``: folders give their images (sorted), image files are tiles, other files slides."""
    from histofm.wsi.readers import IMAGE_EXTENSIONS

    images: list[Path] = []
    slides: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise HistofmError(f"Folder {p} holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))}); check the path.")
            images += found
        elif not p.exists():
            raise HistofmError(f"Input not found: {p}; check the path.")
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            slides.append(p)
    return images, slides


def _slide_coords(slides: list[Path], settings: dict[str, Any], mpp: float | None, tile_size: int) -> list:
    """Level-0 corners ``(N_i, 2)`` of the tissue tiles of each slide (tissue detected once per slide)."""
    from histofm.wsi.readers import open_slide
    from histofm.wsi.tiling import tile_slide

    out = []
    for path in slides:
        slide = open_slide(path, mpp=mpp)
        try:
            out.append(tile_slide(slide, settings["target_mpp"], tile_size, min_tissue=settings["min_tissue"]))
        finally:
            slide.close()
    return out


def _tiles(images: list[Path], slides: list[Path], coords: list, settings: dict[str, Any], mpp: float | None,
           tile_size: int) -> Iterator[tuple[str, int, int, Any]]:
    """``(source, x, y, PIL tile)`` for every image and every tissue tile of every slide."""
    from histofm.data.datasets import load_rgb
    from histofm.wsi.readers import open_slide

    for path in images:
        yield str(path), 0, 0, load_rgb(path)
    for path, corners in zip(slides, coords):
        slide = open_slide(path, mpp=mpp)
        try:
            for x, y in corners.tolist():
                yield str(path), int(x), int(y), slide.read_region_mpp(x, y, tile_size, settings["target_mpp"])
        finally:
            slide.close()


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from histofm.checks import check_out_dir
    from histofm.eval.zeroshot import (
        DEFAULT_TEMPLATES,
        build_prompts,
        class_embeddings,
        mi_zero,
        retrieve,
        tile_logits,
    )

    settings = parse_settings(args.set)
    if not args.classes and not args.query:
        raise HistofmError("Nothing to do: give --classes \"a,b,...\" to classify and/or --query TEXT to retrieve.")
    check_out_dir(args.out)  # the shared check, before a model is built or an image read
    templates = DEFAULT_TEMPLATES
    if args.templates is not None:
        if not args.templates.is_file():
            raise HistofmError(f"Templates file not found: {args.templates}; check --templates.")
        try:
            text = args.templates.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise HistofmError(f"{args.templates} is not UTF-8 text; give --templates a text file, one template "
                               "per line.") from None
        templates = tuple(line.strip() for line in text.splitlines() if line.strip())
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else []
    prompts = build_prompts(classes, templates) if classes else []
    images, slides = collect_inputs(args.inputs)
    encoder = load_encoder(args, settings)
    tile_size = settings["tile_size"] or encoder.image_size

    # ---- embed every tile (images as they are; slides tiled at target_mpp)
    console = Console(stderr=True)
    coords = _slide_coords(slides, settings, args.mpp_override, tile_size)
    total = len(images) + sum(len(c) for c in coords)
    meta: list[tuple[str, int, int]] = []
    embs: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            embs.append(encoder.images(torch.stack(batch)).cpu())
            batch.clear()

    with Progress(TextColumn("zeroshot"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.no_progress) as progress:
        task = progress.add_task("tiles", total=total)
        for source, x, y, tile in _tiles(images, slides, coords, settings, args.mpp_override, tile_size):
            meta.append((source, x, y))
            batch.append(encoder.transform(tile))
            if len(batch) >= settings["batch_size"]:
                flush()
            progress.advance(task)
        flush()
    image_emb = torch.cat(embs)  # (N, E), L2-normalised
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "model": encoder.name, "classes": classes, "templates": list(templates), "n_tiles": len(meta),
        "n_images": len(images), "slides": [str(s) for s in slides], "settings": settings, "logit_scale": encoder.scale(),
    }

    # ---- classification: tiles, then slides by MI-Zero
    if classes:
        logits = tile_logits(image_emb, class_embeddings(encoder, prompts).cpu(), encoder.scale())  # (N, C)
        probs = logits.softmax(-1)
        pred = probs.argmax(-1)
        rows = [[s, x, y, classes[int(p)], *[f"{v:.6f}" for v in pr.tolist()], *[f"{v:.6f}" for v in lg.tolist()]]
                for (s, x, y), p, pr, lg in zip(meta, pred, probs, logits)]
        header = ["source", "x", "y", "prediction", *[f"p_{c}" for c in classes], *[f"logit_{c}" for c in classes]]
        _write_csv(out / "tiles.csv", header, rows)
        summary["tile_counts"] = {c: int((pred == i).sum()) for i, c in enumerate(classes)}
        if slides:
            slide_rows, slide_summary = [], {}
            for s in map(str, slides):
                idx = [i for i, m in enumerate(meta) if m[0] == s]
                sp = mi_zero(logits[idx], settings["topk"]).softmax(-1)
                label = classes[int(sp.argmax())]
                slide_rows.append([s, label, len(idx), *[f"{v:.6f}" for v in sp.tolist()]])
                slide_summary[s] = {"prediction": label, "n_tiles": len(idx), "probabilities": dict(zip(classes, sp.tolist()))}
            _write_csv(out / "slides.csv", ["slide", "prediction", "n_tiles", *[f"p_{c}" for c in classes]], slide_rows)
            summary["slide_predictions"] = slide_summary

    # ---- retrieval
    if args.query:
        idx, sims = retrieve(image_emb, encoder.texts(args.query).cpu(), settings["retrieve"])
        rows = [[q, r + 1, *meta[int(i)], f"{float(v):.6f}"] for q, ii, vv in zip(args.query, idx, sims)
                for r, (i, v) in enumerate(zip(ii, vv))]
        _write_csv(out / "retrieval.csv", ["query", "rank", "source", "x", "y", "similarity"], rows)
        summary["retrieval"] = {q: [list(meta[int(i)]) for i in ii] for q, ii in zip(args.query, idx)}  # [source, x, y]
        _retrieval_png(out / "retrieval.png", args.query, idx, meta, images, slides, settings, args.mpp_override, tile_size)

    from histofm.utils import atomic_path

    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"histofm zeroshot: {len(meta)} tiles from {len(images)} images and {len(slides)} slides -> {out}")
    return 0


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    from histofm.utils import atomic_path

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _retrieval_png(path: Path, queries: list[str], idx: Any, meta: list[tuple[str, int, int]], images: list[Path],  # noqa: ANN401
                   slides: list[Path], settings: dict[str, Any], mpp: float | None, tile_size: int) -> None:
    """One row per query: its top tiles, left to right (thumbnails of 96 px)."""
    from PIL import Image, ImageDraw

    from histofm.data.datasets import load_rgb
    from histofm.wsi.readers import open_slide
    from histofm.wsi.tiling import save_png

    side, label = 96, 16
    cols = max(len(row) for row in idx.tolist())
    canvas = Image.new("RGB", (cols * side, len(queries) * (side + label)), "white")
    draw = ImageDraw.Draw(canvas)
    opened: dict[str, Any] = {}
    image_set = {str(p) for p in images}
    try:
        for r, (q, row) in enumerate(zip(queries, idx.tolist())):
            draw.text((2, r * (side + label) + 2), q[:80], fill="black")
            for c, i in enumerate(row):
                source, x, y = meta[i]
                if source in image_set:
                    tile = load_rgb(Path(source))
                else:
                    if source not in opened:
                        opened[source] = open_slide(source, mpp=mpp)
                    tile = opened[source].read_region_mpp(x, y, tile_size, settings["target_mpp"])
                canvas.paste(tile.convert("RGB").resize((side, side)), (c * side, r * (side + label) + label))
    finally:
        for s in opened.values():
            s.close()
    save_png(canvas, path)
