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
    """Options shared by ``tile`` and ``extract``: resolution, tiling, mpp override, reader and regions."""
    p.add_argument("--target-mpp", "--mpp", dest="target_mpp", type=float, default=0.5,
                   help="microns per pixel of the tiles (0.5 is about 20x)")
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at the target mpp")
    p.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a kept tile (0 keeps all)")
    p.add_argument("--mpp-override", type=float, default=None,
                   help="level-0 microns per pixel of the slides, for files without (or with wrong) metadata; "
                   "a CSV's mpp column wins for its slides")
    p.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "image"],
                   help="slide reader")
    add_roi_arguments(p)


def add_roi_arguments(p: argparse.ArgumentParser) -> None:
    """``--roi`` and its class filters (QuPath GeoJSON annotations), shared by tile, extract and cluster."""
    g = p.add_argument_group("regions (QuPath GeoJSON annotations, level-0 pixels)")
    g.add_argument("--roi", type=Path, default=None, metavar="FILE_OR_DIR",
                   help="a .geojson file, or a folder of <slide>.geojson: tiles are kept inside these regions")
    g.add_argument("--roi-include", default=None, metavar="CLASS,..",
                   help="only annotations of these classes make the region (None: every class)")
    g.add_argument("--roi-exclude", default=None, metavar="CLASS,..",
                   help="annotations of these classes are cut out of the region (e.g. Pen,Necrosis)")
    g.add_argument("--roi-as-tissue", action="store_true",
                   help="use the region as the tissue mask instead of restricting detected tissue to it")


def roi_filter(args: argparse.Namespace) -> Any:
    """The :class:`~histofm.wsi.roi.RoiFilter` of the parsed ``--roi*`` flags (``None`` without ``--roi``)."""
    from histofm.wsi.roi import RoiFilter

    return RoiFilter.create(args.roi, args.roi_include, args.roi_exclude, args.roi_as_tissue)


def check_slide_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range tiling values and an unusable ``--out`` before any slide is read."""
    from histofm.checks import check_alloc, check_out_dir, check_range

    check_range(args.target_mpp, "--target-mpp", low=0.02, high=1000)
    check_range(args.tile_size, "--tile-size", low=1, high=16384, integer=True)
    if not 0 <= args.overlap < args.tile_size:
        raise HistofmError(f"--overlap must be at least 0 and smaller than --tile-size ({args.tile_size}), "
                           f"not {args.overlap}.")
    check_range(args.min_tissue, "--min-tissue", low=0, high=1)
    # The same plausible range as a slide list's mpp column (see histofm.wsi.slides).
    check_range(args.mpp_override, "--mpp-override", low=0.02, high=50)
    if hasattr(args, "batch_size"):
        check_range(args.batch_size, "--batch-size", low=1, high=65536, integer=True)
        # uint8 tiles from the workers (two batches in flight) and their float32 copy: 11 bytes per value.
        check_alloc(11 * 3 * args.batch_size * args.tile_size**2,
                    f"A batch of {args.batch_size} tiles of {args.tile_size} px", "--batch-size or --tile-size")
    if hasattr(args, "workers"):
        check_range(args.workers, "--workers", low=0, high=256, integer=True)
    check_out_dir(args.out)


def slide_inputs(args: argparse.Namespace) -> list[Any]:
    """The slides of the positional arguments (files, folders, CSV lists), with per-slide mpp."""
    from histofm.wsi.slides import resolve_slides

    return resolve_slides(args.slides)


def register(sub: argparse._SubParsersAction) -> None:
    from histofm.commands._common import add_command

    p = add_command(
        sub, "tile", help="find tissue and tile slides (coordinates + thumbnail with the grid)",
        example="""histofm tile slide.svs --out tiles/
histofm tile slides/ --target-mpp 0.5 --tile-size 256 --roi annotations/ --roi-include Tumor --out tiles/
histofm tile cohort.csv --format csv --out tiles/""",
        description=__doc__,
    )
    p.add_argument("slides", nargs="+", type=Path, metavar="SLIDE",
                   help="slide files (.svs, .tif, .png ...), folders of slides, or CSV files of slide_path[,mpp] rows")
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
    check_slide_arguments(args)
    slides = slide_inputs(args)
    roi = roi_filter(args)
    failures = 0
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=len(slides) < 2)
    with bars:
        task = bars.add_task("tiling", total=len(slides))
        for item in slides:
            failures += _tile_one(item, args, roi, table)
            bars.advance(task)
    if failures < len(slides):
        console.print(table)
    return 2 if failures else 0


def _tile_one(item: Any, args: argparse.Namespace, roi: Any, table: Any) -> int:
    """Tile one slide and add its row to ``table``; 1 if it failed (reported on stderr), else 0."""
    from histofm.wsi import draw_tiles, open_slide, save_coords, tile_spec
    from histofm.wsi.selection import select_tiles
    from histofm.wsi.tiling import save_png

    path = item.path
    mpp = item.mpp if item.mpp is not None else args.mpp_override
    try:
        with open_slide(path, mpp=mpp, backend=args.backend) as slide:
            spec = tile_spec(slide, args.target_mpp, args.tile_size, args.overlap)
            selection = select_tiles(slide, spec, min_tissue=args.min_tissue, roi=roi, want_tissue=True)
            coords, tissue = selection.coords, selection.tissue
            name = slide.name
            out = args.out / f"{name}.{args.format}"
            extra = {"min_tissue": args.min_tissue, "roi": selection.roi}
            save_coords(out, coords, spec, name=name, extra_attrs=extra)
            title = f"{name}: {len(coords)} tiles of {args.tile_size} px at {args.target_mpp:g} um/px"
            save_png(draw_tiles(slide, coords, spec.size_level0, tissue=tissue, title=title),
                     args.out / f"{name}_tiles.png")
            if tissue is not None:
                tissue.save_png(args.out / f"{name}_tissue.png")
                tissue.save_geojson(args.out / f"{name}_tissue.geojson", name=name)
            fraction = f"{tissue.fraction:.0%}" if tissue is not None else "-"
            table.add_row(path.name, f"{slide.mpp:.4g}", str(spec.level), fraction, str(len(coords)), str(out))
    except HistofmError as e:
        print(f"histofm: error: {e}", file=sys.stderr)
        return 1
    return 0
