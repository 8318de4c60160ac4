"""``histofm cluster``: a tissue-phenotype map of a slide (k-means on tile embeddings).

    histofm cluster slide.svs --model uni --checkpoint uni.bin --k 6 --out maps/
    histofm cluster slide.svs --features feats/slide.h5 --k 6 --out maps/

With ``--model`` the weights must be named: ``--checkpoint PATH``, ``--pretrained`` or
``--random-init``. ``--roi`` restricts the tiles to QuPath GeoJSON regions.

Writes ``<slide>_clusters.png`` (tiles coloured by cluster on the thumbnail),
``<slide>_prototypes.png`` (the tiles nearest each centroid) and
``<slide>_clusters.csv``; with ``--model`` also the feature file ``<slide>.h5``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from histofm.commands._common import add_command
    from histofm.commands.tile import add_roi_arguments
    from histofm.weights import add_weights_arguments

    p = add_command(
        sub, "cluster", help="cluster a slide's tiles into tissue phenotypes and map them",
        example="""histofm cluster slide.svs --model uni --checkpoint uni.bin --k 6 --out maps/
histofm cluster slide.svs --features feats/features_uni/slide.h5 --k 6 --out maps/""",
        description=__doc__,
    )
    p.add_argument("slide", type=Path, help="whole-slide image (.svs, .tif, ...) or a plain image with --mpp-override")
    p.add_argument("--model", help="registered tile encoder (histofm models) used to embed the tiles")
    add_weights_arguments(p)
    p.add_argument("--features", type=Path, help="an existing feature file of this slide (skips embedding)")
    p.add_argument("--k", type=int, default=4, help="number of clusters")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--target-mpp", "--mpp", dest="mpp", type=float, default=0.5, help="microns per pixel of the tiles")
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at --target-mpp")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass when embedding")
    p.add_argument("--no-normalize", action="store_true", help="cluster raw embeddings (default: L2-normalised)")
    p.add_argument("--prototypes", type=int, default=6, help="tiles shown per cluster")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means initialisation")
    p.add_argument("--device", help="cpu, cuda, ... (None: the best available)")
    p.add_argument("--mpp-override", type=float, dest="mpp_override",
                   help="level-0 microns per pixel of a slide whose metadata has none (or a wrong one)")
    p.add_argument("--slide-mpp", type=float, dest="mpp_override", help=argparse.SUPPRESS)  # deprecated alias
    add_roi_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histofm.checks import check_device, check_out_dir, check_range
    from histofm.errors import HistofmError
    from histofm.learning.cluster_map import cluster_map

    check_range(args.k, "--k", low=1, integer=True)
    check_range(args.prototypes, "--prototypes", low=1, high=100, integer=True)
    check_range(args.mpp, "--target-mpp", low=0.02, high=1000)
    check_range(args.tile_size, "--tile-size", low=1, high=16384, integer=True)
    check_range(args.min_tissue, "--min-tissue", low=0, high=1)
    check_range(args.mpp_override, "--mpp-override", low=0.02, high=50)
    check_range(args.batch_size, "--batch-size", low=1, high=65536, integer=True)
    check_device(args.device)
    if args.model is None and args.features is None:
        raise HistofmError("Give --model NAME to embed the tiles, or --features FILE.h5 with existing embeddings.")
    if args.features is not None and args.model is not None:
        raise HistofmError("Give either --model or --features, not both.")
    check_out_dir(args.out)
    features = args.features
    if features is not None:
        _check_embeddings(features, args.slide.name)
    if args.model is not None:
        features = _embed(args)
    elif args.roi is not None:
        raise HistofmError("--roi selects tiles to embed, so it needs --model; with --features, extract with --roi.")
    result = cluster_map(
        args.slide, args.out, features=features, k=args.k, target_mpp=args.mpp, tile_size=args.tile_size,
        min_tissue=args.min_tissue, batch_size=args.batch_size, normalize=not args.no_normalize,
        n_prototypes=args.prototypes, seed=args.seed, device=args.device, mpp=args.mpp_override,
        progress=not args.no_progress,
    )
    counts = ", ".join(f"{j}: {n}" for j, n in enumerate(result.counts))
    print(f"{args.slide.name}: {len(result.labels)} tiles in {args.k} clusters ({counts}); "
          f"map {result.paths['map']}, prototypes {result.paths['prototypes']}, table {result.paths['csv']}")
    return 0


def _check_embeddings(path: Path, slide: str) -> None:
    """Refuse a feature file with non-finite embeddings (k-means over NaN gives a meaningless map)."""
    import numpy as np

    from histofm.errors import HistofmError
    from histofm.wsi.features import read_features

    feats, _, _ = read_features(path)
    bad = int(feats.size - np.isfinite(feats).sum())
    if bad:
        raise HistofmError(f"{path.name} holds {bad} non-finite (NaN or infinite) embeddings of {slide}; "
                           "extract it again with finite weights (--features).")


def _embed(args: argparse.Namespace) -> Path:
    """Embed the slide's tiles with the named weights (provenance recorded) into ``<out>/<slide>.h5``."""
    from histofm.commands.tile import roi_filter
    from histofm.errors import HistofmError
    from histofm.utils import default_device
    from histofm.weights import load_encoder
    from histofm.wsi.features import ExtractConfig, extract_features

    if args.k < 1:  # before the (slow) embedding
        raise HistofmError(f"The number of clusters must be at least 1, got {args.k}; raise --k.")
    model = load_encoder(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                         random_init=args.random_init)
    cfg = ExtractConfig(target_mpp=args.mpp, tile_size=args.tile_size, min_tissue=args.min_tissue,
                        batch_size=args.batch_size, device=args.device or str(default_device()), layout="flat",
                        roi=roi_filter(args))

    def warn(message: str) -> None:
        print(f"histofm: warning: {message}", file=sys.stderr)

    report = extract_features([args.slide], model, args.out, config=cfg, mpp=args.mpp_override,
                              progress=not args.no_progress, warn=warn)
    if report.failures:
        raise HistofmError(f"Embedding {args.slide.name} failed: {report.failures[0].error}")
    return args.out / f"{args.slide.stem}.h5"
