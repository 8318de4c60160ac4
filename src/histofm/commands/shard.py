"""``histofm shard``: tissue tiles of many slides into WebDataset shards, for streaming pretraining.

Writes ``shard-000000.tar ...`` (each tile as ``<index>.jpg`` + ``<index>.json`` with slide, level-0
x/y, mpp, tile size, magnification) and ``index.json`` (shards, sample counts, tile settings,
slides, provenance) into ``--out``. Shards are written under temporary names and renamed when
complete; ``index.json`` comes last. ``histofm pretrain --data OUT`` then streams from them
(see ``docs/training.md``, "Pretraining at scale").

A slide that fails is reported on stderr in one line and the others go on; the exit code
is then non-zero.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _mpps(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected microns per pixel like 0.5 or 0.5,1.0, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one mpp, e.g. 0.5")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"microns per pixel must be positive numbers, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    from histofm.commands._common import add_command
    from histofm.commands.tile import add_roi_arguments

    p = add_command(
        sub, "shard", help="write tissue tiles of many slides into WebDataset shards (streaming pretraining data)",
        example="""histofm shard slides/ --out shards/
histofm shard cohort.csv --target-mpp 0.5,1.0 --tile-size 224 --shard-size 5000 --out shards/
histofm pretrain --method dinov2 --model vit_small_patch16_224 --data shards/ --out runs/dinov2""",
        description=__doc__,
    )
    p.add_argument("slides", nargs="+", type=Path, metavar="SLIDE",
                   help="slide files, folders of slides, or CSV files of slide_path[,mpp] rows")
    p.add_argument("--out", type=Path, required=True, help="output directory (shards + index.json)")
    p.add_argument("--target-mpp", "--mpp", dest="target_mpp", type=_mpps, default=(0.5,),
                   help="microns per pixel of the tiles; several, comma-separated, store every magnification")
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at each target mpp")
    p.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a kept tile")
    p.add_argument("--shard-size", type=int, default=5000, help="tiles per shard")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored tiles")
    p.add_argument("--mpp-override", type=float, default=None,
                   help="level-0 microns per pixel for slides without (or with wrong) metadata")
    p.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "image"], help="slide reader")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_roi_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histofm.checks import check_out_dir, check_range
    from histofm.commands.tile import roi_filter
    from histofm.data.shards import ShardSettings, write_shards
    from histofm.wsi.slides import resolve_slides

    check_out_dir(args.out)
    check_range(args.mpp_override, "--mpp-override", low=0, low_open=True)  # before any slide, not once per slide
    # ShardSettings.check covers --target-mpp, --shard-size and --quality; these would otherwise fail once per slide
    check_range(args.tile_size, "--tile-size", low=1, integer=True)
    check_range(args.overlap, "--overlap", low=0, high=args.tile_size - 1, integer=True)
    check_range(args.min_tissue, "--min-tissue", low=0, high=1)
    settings = ShardSettings(
        target_mpps=tuple(args.target_mpp), tile_size=args.tile_size, min_tissue=args.min_tissue,
        overlap=args.overlap, shard_size=args.shard_size, quality=args.quality,
    )
    slides = resolve_slides(args.slides)
    index = write_shards(slides, args.out, settings, mpp_override=args.mpp_override, backend=args.backend, roi=roi_filter(args),
                         progress=not args.no_progress)
    print(f"histofm shard: {index['samples']} tiles from {len(index['slides'])} slides in "
          f"{len(index['shards'])} shards ({args.out / 'index.json'}).")
    return 2 if index["failed"] else 0
