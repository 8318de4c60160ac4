"""``histofm tile``: find tissue and tile slides; write coordinates and a picture of the grid.

For each slide, in ``--out``:

* ``<name>.h5`` (or ``.csv`` with ``--format csv``): level-0 tile coordinates, CLAM / TRIDENT layout;
* ``<name>_tiles.png``: thumbnail with the tissue mask (green) and the tiles (blue);
* ``<name>_tissue.png`` and ``<name>_tissue.geojson``: the mask and its contours (level-0 pixels).

A slide that fails is reported on stderr in one line and the others go on; the exit code
is then non-zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from histofm.errors import HistofmError


def add_slide_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``tile`` and ``extract``."""
    p.add_argument("--target-mpp", "--mpp", dest="target_mpp", type=float, default=0.5,
                   help="microns per pixel of the tiles (default 0.5, about 20x)")
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at the target mpp")
    p.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a kept tile (0 keeps all)")
    p.add_argument("--mpp-override", type=float, default=None,
                   help="level-0 microns per pixel of the slides, for files without (or with wrong) metadata")
    p.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "image"],
                   help="slide reader")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tile", help="find tissue and tile slides (coordinates + thumbnail with the grid)")
    p.add_argument("slides", nargs="+", type=Path, metavar="SLIDE", help="slide files (.svs, .tif, .png ...)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_slide_arguments(p)
    p.add_argument("--format", choices=["h5", "csv"], default="h5", help="coordinates file format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    table = Table(title="Tiling")
    for col in ("slide", "mpp", "level", "tissue", "tiles", "coordinates"):
        table.add_column(col)
    failures = 0
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=len(args.slides) < 2)
    with bars:
        task = bars.add_task("tiling", total=len(args.slides))
        for path in args.slides:
            failures += _tile_one(path, args, table)
            bars.advance(task)
    if failures < len(args.slides):
        console.print(table)
    return 2 if failures else 0


def _tile_one(path: Path, args: argparse.Namespace, table: Any) -> int:
    """Tile one slide and add its row to ``table``; 1 if it failed (reported on stderr), else 0."""
    from histofm.wsi import detect_tissue, draw_tiles, open_slide, save_coords, tile_slide, tile_spec
    from histofm.wsi.tiling import save_png

    try:
        with open_slide(path, mpp=args.mpp_override, backend=args.backend) as slide:
            spec = tile_spec(slide, args.target_mpp, args.tile_size, args.overlap)
            tissue = detect_tissue(slide)
            coords = tile_slide(
                slide, args.target_mpp, args.tile_size,
                overlap=args.overlap, min_tissue=args.min_tissue, tissue=tissue,
            )
            name = slide.name
            out = args.out / f"{name}.{args.format}"
            save_coords(out, coords, spec, name=name, extra_attrs={"min_tissue": args.min_tissue})
            title = f"{name}: {len(coords)} tiles of {args.tile_size} px at {args.target_mpp:g} um/px"
            save_png(draw_tiles(slide, coords, spec.size_level0, tissue=tissue, title=title),
                     args.out / f"{name}_tiles.png")
            tissue.save_png(args.out / f"{name}_tissue.png")
            tissue.save_geojson(args.out / f"{name}_tissue.geojson", name=name)
            table.add_row(path.name, f"{slide.mpp:.4g}", str(spec.level), f"{tissue.fraction:.0%}",
                          str(len(coords)), str(out))
    except HistofmError as e:
        print(f"histofm: error: {e}", file=sys.stderr)
        return 1
    return 0
