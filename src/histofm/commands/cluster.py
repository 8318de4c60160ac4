"""``histofm cluster``: a tissue-phenotype map of a slide (k-means on tile embeddings).

    histofm cluster slide.svs --model uni --k 6 --out maps/
    histofm cluster slide.svs --features feats/slide.h5 --k 6 --out maps/

Writes ``<slide>_clusters.png`` (tiles coloured by cluster on the thumbnail),
``<slide>_prototypes.png`` (the tiles nearest each centroid) and
``<slide>_clusters.csv``; with ``--model`` also the feature file ``<slide>.h5``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="cluster a slide's tiles into tissue phenotypes and map them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slide", type=Path, help="whole-slide image (.svs, .tif, ...) or a plain image with --slide-mpp")
    p.add_argument("--model", help="registered tile encoder (histofm models) used to embed the tiles")
    p.add_argument("--checkpoint", type=Path, help="local weights for --model")
    p.add_argument("--features", type=Path, help="an existing feature file of this slide (skips embedding)")
    p.add_argument("--k", type=int, default=4, help="number of clusters")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the tiles")
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at --mpp")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-normalize", action="store_true", help="cluster raw embeddings (default: L2-normalised)")
    p.add_argument("--prototypes", type=int, default=6, help="tiles shown per cluster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--slide-mpp", type=float, help="level-0 mpp of a slide whose metadata has none")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histofm.errors import HistofmError
    from histofm.learning.cluster_map import cluster_map

    if args.model is None and args.features is None:
        raise HistofmError("Give --model NAME to embed the tiles, or --features FILE.h5 with existing embeddings.")
    if args.features is not None and args.model is not None:
        raise HistofmError("Give either --model or --features, not both.")
    result = cluster_map(
        args.slide, args.out, model=args.model, checkpoint=args.checkpoint, features=args.features, k=args.k,
        target_mpp=args.mpp, tile_size=args.tile_size, min_tissue=args.min_tissue, batch_size=args.batch_size,
        normalize=not args.no_normalize, n_prototypes=args.prototypes, seed=args.seed, device=args.device,
        mpp=args.slide_mpp, progress=not args.no_progress,
    )
    counts = ", ".join(f"{j}: {n}" for j, n in enumerate(result.counts))
    print(f"{args.slide.name}: {len(result.labels)} tiles in {args.k} clusters ({counts}); "
          f"map {result.paths['map']}, prototypes {result.paths['prototypes']}, table {result.paths['csv']}")
    return 0
