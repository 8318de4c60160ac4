"""``histofm slide-embed``: slide embeddings from tile-feature files with a slide encoder.

Reads every ``*.h5`` of FEATURES_DIR (written by ``histofm extract``) and writes one
``<slide>.h5`` per slide into ``--out`` (default ``FEATURES_DIR/slide_embeddings_<encoder>``);
the layout is described in :mod:`histofm.wsi.slide_embed`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from histofm.commands._common import add_command
from histofm.commands._vocab import parse_set
from histofm.errors import HistofmError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "slide-embed", help="embed slides from their tile features with a slide encoder (Prov-GigaPath, TITAN)",
        example=(
            "histofm slide-embed --slide-encoder prov_gigapath_slide --pretrained features/ --out slide_emb/\n"
            "histofm slide-embed --slide-encoder titan --checkpoint TITAN/model.safetensors features/"
        ),
    )
    p.add_argument("features", type=Path, metavar="FEATURES_DIR", help="folder of tile-feature .h5 files")
    p.add_argument("--slide-encoder", required=True, help="registered slide encoder (prov_gigapath_slide, titan)")
    p.add_argument("--checkpoint", type=Path, default=None, help="official weights file or snapshot folder")
    p.add_argument("--pretrained", action="store_true", help="download the official weights (gated: set HF_TOKEN)")
    p.add_argument("--random-init", action="store_true", help="run with random weights (tests and demos only)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory; unset: FEATURES_DIR/slide_embeddings_<encoder>")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor override (depth=2 ...); tile_size=<level-0 px> sets the tile step")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best available)")
    p.add_argument("--any-tile-encoder", action="store_true",
                   help="embed features of another tile encoder than the one the slide encoder was trained on")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose output exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from histofm.checks import check_device, check_out_dir
    from histofm.registry import create_slide_encoder
    from histofm.utils import default_device
    from histofm.wsi.slide_embed import embed_feature_dir, slide_embedding_dir

    if not args.features.is_dir():
        raise HistofmError(f"Feature folder not found: {args.features}; pass the --out folder of `histofm extract`.")
    files = sorted(args.features.glob("*.h5"))
    if not files:
        raise HistofmError(f"No tile-feature files (*.h5) in {args.features}; run `histofm extract` first.")
    if not (args.checkpoint or args.pretrained or args.random_init):
        raise HistofmError(
            f"{args.slide_encoder} needs weights: pass --checkpoint PATH or --pretrained (or --random-init to test)."
        )
    settings = parse_set(args.set)
    tile_size = settings.pop("tile_size", None)
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int | float)
                                  or not math.isfinite(tile_size) or tile_size <= 0):
        raise HistofmError(f"--set tile_size must be a positive number of level-0 pixels, not {tile_size!r}.")
    check_device(args.device)  # the shared checks, before a model is built
    out = args.out or slide_embedding_dir(args.features, args.slide_encoder)
    check_out_dir(out)
    for key in ("depth", "num_heads", "embed_dim", "in_chans"):  # sizes: a zero-layer model would run silently
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HistofmError(f"--set {key} must be a whole number of at least 1, not {value!r}.")
    try:
        model = create_slide_encoder(
            args.slide_encoder, pretrained=args.pretrained, checkpoint_path=args.checkpoint, **settings
        )
    except (TypeError, ValueError) as e:  # a constructor refusing the --set values (heads not dividing the width)
        raise HistofmError(f"{args.slide_encoder} cannot be built with these --set values ({e}).") from None
    device = args.device or default_device()
    model = model.to(device)
    report = embed_feature_dir(
        files, model, out, tile_size=tile_size, device=device, any_tile_encoder=args.any_tile_encoder,
        overwrite=args.overwrite, checkpoint=args.checkpoint, progress=not args.no_progress,
    )
    console = Console()
    console.print(
        f"{len(report.written)} slide embeddings written to {out}, {len(report.skipped)} already there, "
        f"{len(report.failures)} failed.", highlight=False,
    )
    for slide, error in report.failures:
        print(f"histofm: error: {slide}: {error}", file=sys.stderr)
    return 2 if report.failures else 0
