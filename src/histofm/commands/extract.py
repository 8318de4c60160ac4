"""``histofm extract``: embed the tissue tiles of slides with a tile encoder, one HDF5 per slide.

Weights are never random unless asked: give --checkpoint PATH, --pretrained or
--random-init. Each file records its provenance (model, weights, preprocessing, tiling,
slide fingerprint, version); a rerun skips a slide only when all of it matches.
Under ``torchrun`` each process takes its share of the slides (``RANK`` / ``WORLD_SIZE``
from the environment) and uses the GPU of its ``LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histofm.commands.tile import add_slide_arguments, roi_filter, slide_inputs
from histofm.errors import HistofmError

LAYOUT_CHOICES = ("trident", "clam", "flat")

if TYPE_CHECKING:
    from histofm.wsi.features import ExtractionReport


def register(sub: argparse._SubParsersAction) -> None:
    from histofm.commands._common import add_command
    from histofm.commands._vocab import add_set_argument
    from histofm.weights import add_weights_arguments

    p = add_command(
        sub, "extract", help="extract tile features of slides to HDF5 (TRIDENT or CLAM layout)",
        example="""histofm extract slides/ --model uni --checkpoint uni.bin --out feats/
histofm extract cohort.csv --model kaiko_vits16 --pretrained --layout clam --out feats/
histofm extract slides/*.svs --model uni --pretrained --coords tiles/ --roi annotations/ --roi-exclude Pen --out feats/""",
        description=__doc__,
    )
    p.add_argument("slides", nargs="+", type=Path, metavar="SLIDE",
                   help="slide files, folders of slides, or CSV files of slide_path[,mpp] rows")
    p.add_argument("--model", required=True, help="registered tile encoder (see `histofm models`)")
    add_weights_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--layout", choices=LAYOUT_CHOICES, default="trident",
                   help="trident: <out>/features_<model>/<slide>.h5; clam: <out>/h5_files/ + <out>/pt_files/; "
                   "flat: <out>/<slide>.h5 (TRIDENT attributes)")
    add_slide_arguments(p)
    p.add_argument("--coords", type=Path, default=None, metavar="DIR",
                   help="reuse tile coordinates from `histofm tile`, TRIDENT or CLAM patch files in DIR "
                   "(no tissue detection)")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tile-reading processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (None: the best available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision of the encoder (features are stored as float32)")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose output exists")
    p.add_argument("--compile", action="store_true", help="torch.compile each Transformer block (slow first batch)")
    p.add_argument("--channels-last", action="store_true", help="NHWC images and convolution weights")
    p.add_argument("--stain-norm", choices=["macenko", "reinhard", "vahadane"], default=None,
                   help="stain-normalise every tile onto --stain-target before encoding (recorded in the provenance)")
    p.add_argument("--stain-target", default=None, metavar="IMAGE",
                   help="target image of --stain-norm: an image file, a slide, or a bundled sample name (hgsc_stroma)")
    p.add_argument("--slide-encoder", default=None, metavar="NAME",
                   help="also embed each slide from its tile features with this slide encoder (prov_gigapath_slide, "
                   "titan): slide_embeddings_<NAME>/ beside the features (see `histofm slide-embed`)")
    p.add_argument("--slide-checkpoint", type=Path, default=None, metavar="PATH",
                   help="weights of --slide-encoder (or --slide-pretrained, or --slide-random-init)")
    p.add_argument("--slide-pretrained", action="store_true", help="official weights of --slide-encoder from the hub")
    p.add_argument("--slide-random-init", action="store_true", help="--slide-encoder with random weights, explicitly")
    add_set_argument(p, help="constructor override of --model, for a backbone pretrained with other settings, "
                             "e.g. --set depth=2 (repeatable; the pretraining run's backbone.json lists them)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    import histofm
    from histofm.checks import check_device
    from histofm.commands._recorded_arch import check_recorded_arch
    from histofm.commands._settings import check_model_overrides
    from histofm.commands._vocab import parse_set
    from histofm.commands.tile import check_slide_arguments
    from histofm.weights import load_encoder, weights_of
    from histofm.wsi.features import ExtractConfig, extract_features
    from histofm.wsi.layouts import feature_path

    check_slide_arguments(args)
    check_device(args.device)
    overrides = check_model_overrides(args.model, parse_set(args.set))  # a bad value: one sentence, before any work
    # A histofm export (backbone.json beside it) names the --model/--set that rebuild it: say so, not 'missing N keys'.
    check_recorded_arch(args.checkpoint, args.model, overrides)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if device is None and world_size > 1 and histofm.utils.default_device().type == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    slides = slide_inputs(args)
    config = ExtractConfig(
        target_mpp=args.target_mpp, tile_size=args.tile_size, overlap=args.overlap, min_tissue=args.min_tissue,
        batch_size=args.batch_size, num_workers=args.workers, device=device, precision=args.precision,
        backend=args.backend, overwrite=args.overwrite, compile=args.compile, channels_last=args.channels_last,
        layout=args.layout, coords_dir=args.coords, roi=roi_filter(args),
        stain_norm=args.stain_norm, stain_target=args.stain_target,
    )
    if (args.stain_norm is None) != (args.stain_target is None):
        raise HistofmError("--stain-norm and --stain-target go together: pass both, or neither.")
    if args.stain_target is not None:
        from histofm.data.stain import make_stain_transform

        # A missing, unreadable, blank or grey target fails before any work (the fit is cached for the run).
        make_stain_transform(args.stain_norm, args.stain_target)
    slide_encoder = _slide_encoder(args)  # before any work: an unknown name or missing weights fail here
    model = load_encoder(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                         random_init=args.random_init, **overrides)
    console = Console()

    def warn(message: str) -> None:
        if rank == 0:
            print(f"histofm: warning: {message}", file=sys.stderr)

    report = extract_features(
        slides, model, args.out, config=config, mpp=args.mpp_override,
        rank=rank, world_size=world_size, progress=not args.no_progress, console=console, warn=warn,
    )
    if slide_encoder is not None:  # each rank embeds the slides it extracted
        _embed_slides(args, report, slide_encoder, device)
    if world_size > 1:
        report = _gather_reports(report)  # one summary for the whole job, printed by rank 0
        if rank != 0:
            return 2 if report.failures else 0
    console.print(report.table())
    console.print(report.summary(), highlight=False)
    folder = feature_path(args.out, "x", args.model, args.layout).parent
    console.print(f"features in {folder} (weights: {weights_of(model).describe()})", highlight=False)
    for failure in report.failures:
        print(f"histofm: error: {failure.slide}: {failure.error}", file=sys.stderr)
    return 2 if report.failures else 0


def _slide_encoder(args: argparse.Namespace) -> Any:  # noqa: ANN401
    """The ``--slide-encoder`` module with its weights, or None; refuses a name without exactly one weights flag."""
    chosen = [f for f, on in (("--slide-checkpoint", args.slide_checkpoint is not None),
                              ("--slide-pretrained", args.slide_pretrained),
                              ("--slide-random-init", args.slide_random_init)) if on]
    if args.slide_encoder is None:
        if chosen:
            raise HistofmError(f"{chosen[0]} needs --slide-encoder NAME.")
        return None
    if len(chosen) != 1:
        raise HistofmError(
            f"--slide-encoder {args.slide_encoder} needs exactly one of --slide-checkpoint PATH, --slide-pretrained "
            f"or --slide-random-init (got {len(chosen)})."
        )
    from histofm.registry import create_slide_encoder

    return create_slide_encoder(args.slide_encoder, pretrained=args.slide_pretrained,
                                checkpoint_path=args.slide_checkpoint)


def _embed_slides(args: argparse.Namespace, report: ExtractionReport, encoder: Any, device: str | None) -> None:  # noqa: ANN401
    """Slide embeddings of this run's feature files, beside them; a slide that fails is added to the report."""
    from histofm.utils import default_device
    from histofm.wsi.slide_embed import embed_feature_dir, slide_embedding_dir

    files = [r.output for r in report.results if r.status in ("done", "skipped") and r.output is not None]
    if not files:
        return
    dev = device or default_device()
    out = slide_embedding_dir(Path(files[0]).parent, args.slide_encoder)
    embedded = embed_feature_dir(files, encoder.to(dev), out, device=dev, overwrite=args.overwrite,
                                 checkpoint=args.slide_checkpoint, progress=not args.no_progress)
    for slide, error in embedded.failures:
        for r in report.results:
            if r.output is not None and Path(r.output).stem == Path(slide).stem:
                r.status, r.error = "failed", f"slide embedding: {error}"


def _gather_reports(report: ExtractionReport) -> ExtractionReport:
    """Collect every rank's per-slide results (gloo; ``torchrun`` sets the rendezvous variables)."""
    import torch.distributed as dist

    from histofm.wsi.features import ExtractionReport

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    try:
        parts: list[ExtractionReport | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, report)
    finally:
        if own_group:
            dist.destroy_process_group()
    merged = ExtractionReport()
    for part in parts:
        merged.results.extend(part.results if part is not None else [])
    merged.results.sort(key=lambda r: r.slide)
    return merged
