"""Slide embeddings: run a slide encoder over the tile-feature files of ``histofm extract``.

Layout (beside the tile features, one file per slide)::

    <features dir>/
        <slide>.h5                                  tile features (histofm extract)
        slide_embeddings_<encoder>/<slide>.h5       this module's output

Each output file holds:

* ``embedding``: ``(D,)`` float32, the slide embedding;
* attributes: ``slide_encoder`` (registered name), ``embed_dim``, ``tile_encoder`` (the
  ``model_name`` of the tile features), ``source`` (the feature file's name), ``num_tiles``,
  ``tile_size_level0`` (the grid step used, level-0 pixels), ``mpp``, ``slide``,
  ``checkpoint`` (file name of the weights, or ``""`` for random weights),
  ``histofm_version``.

Files are written under a temporary name and renamed (never half-written). The grid step
is the features' ``patch_size_level0`` attribute (TRIDENT / histofm files); coordinates are
level-0 pixels, so ``floor(coords / step)`` is the tile's cell whatever the magnification.

:func:`embed_slide_file` is what ``histofm extract --slide-encoder`` calls per slide;
:func:`embed_feature_dir` is the ``histofm slide-embed`` command's loop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.utils import atomic_path
from histofm.wsi.features import read_features

EMBEDDING_DATASET = "embedding"


def slide_embedding_dir(features_dir: str | os.PathLike[str], encoder_name: str) -> Path:
    """The default output folder: ``<features_dir>/slide_embeddings_<encoder_name>``."""
    return Path(features_dir) / f"slide_embeddings_{encoder_name}"


def tile_step(coords: np.ndarray, attrs: dict[str, Any]) -> float:
    """Level-0 pixel step between neighbouring tiles: ``patch_size_level0``, else the smallest coordinate gap."""
    step = attrs.get("patch_size_level0")
    if step:
        return float(step)
    gaps = [np.diff(np.unique(coords[:, i])) for i in range(2)]
    gaps = [g[g > 0] for g in gaps if g.size]
    if gaps and any(g.size for g in gaps):
        return float(min(g.min() for g in gaps if g.size))
    raise HistofmError(
        "The feature file records no patch_size_level0 and has too few tiles to infer the tile step; "
        "pass tile_size (--set tile_size=<level-0 px>)."
    )


def _check_source(encoder: nn.Module, attrs: dict[str, Any], path: Path, any_tile_encoder: bool) -> None:
    from histofm.registry import list_slide_encoders, slide_encoder_info

    name = getattr(encoder, "histofm_name", None)
    if any_tile_encoder or name not in list_slide_encoders():
        return
    info = slide_encoder_info(name)
    if not info.tile_encoder:
        return
    made_by = str(attrs.get("model_name", "unknown"))
    if made_by != info.tile_encoder:
        raise HistofmError(
            f"{path.name} holds {made_by} tile features but {name} was trained on {info.tile_encoder} features; "
            f"extract with --model {info.tile_encoder}, or pass --any-tile-encoder to embed anyway."
        )


def embed_slide_file(
    h5_path: str | os.PathLike[str],
    encoder: nn.Module,
    *,
    tile_size: float | None = None,
    device: str | torch.device | None = None,
    any_tile_encoder: bool = False,
) -> np.ndarray:
    """The slide embedding ``(D,)`` float32 of one tile-feature file.

    Args:
        h5_path: a ``histofm extract`` (or CLAM / TRIDENT) feature file.
        encoder: a slide encoder from :func:`histofm.registry.create_slide_encoder`.
        tile_size: level-0 pixel step of one tile (default: read from the file).
        device: where to run (default: the encoder's device).
        any_tile_encoder: skip the check that the features come from the tile encoder the
            slide encoder was trained on.
    """
    path = Path(h5_path)
    return _embed(path, *read_features(path), encoder, tile_size, device, any_tile_encoder)[0]


def _embed(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
    encoder: nn.Module,
    tile_size: float | None,
    device: str | torch.device | None,
    any_tile_encoder: bool,
) -> tuple[np.ndarray, float]:
    """``(embedding (D,), tile step used)`` for one slide's ``features (N, C)`` and ``coords (N, 2)``."""
    _check_source(encoder, attrs, path, any_tile_encoder)
    if len(features) == 0:
        raise HistofmError(f"{path.name} holds no tiles; check the tissue detection of `histofm extract`.")
    in_dim = getattr(encoder, "in_chans", features.shape[1])
    if features.shape[1] != in_dim:
        raise HistofmError(
            f"{path.name} holds {features.shape[1]}-d tile features but the slide encoder reads {in_dim}-d ones; "
            "extract features with its tile encoder."
        )
    step = float(tile_size) if tile_size else tile_step(coords, attrs)
    dev = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder.eval()
    with torch.no_grad():
        x = torch.from_numpy(features).to(dev)[None]  # (1, N, C)
        c = torch.from_numpy(coords).to(dev, torch.float64)[None]  # (1, N, 2) level-0 pixels
        emb = encoder(x, c, tile_size=step)  # (1, D)
    return emb[0].float().cpu().numpy(), step


def write_slide_embedding(
    out_dir: str | os.PathLike[str],
    slide: str,
    embedding: np.ndarray,
    *,
    slide_encoder: str,
    source: str | os.PathLike[str] | None = None,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write ``<out_dir>/<slide>.h5`` atomically (dataset ``embedding``, provenance attributes); return its path."""
    import h5py

    from histofm._version import __version__

    embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
    target = Path(out_dir) / f"{slide}.h5"
    meta: dict[str, Any] = {
        "slide_encoder": slide_encoder,
        "embed_dim": int(embedding.shape[0]),
        "slide": slide,
        "source": Path(source).name if source is not None else "",
        "histofm_version": __version__,
        **(attrs or {}),
    }
    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(EMBEDDING_DATASET, data=embedding)
            for k, v in meta.items():
                f.attrs[k] = "" if v is None else v
    return target


def read_slide_embeddings(folder: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """``(slide names, embeddings (S, D), attrs of the first file)`` from a ``slide_embeddings_*`` folder."""
    import h5py

    folder = Path(folder)
    files = sorted(folder.glob("*.h5")) if folder.is_dir() else []
    if not files:
        raise HistofmError(f"No slide embeddings (*.h5) in {folder}; run `histofm slide-embed` first.")
    names, rows, first = [], [], {}
    for p in files:
        try:
            with h5py.File(p, "r") as f:
                rows.append(np.asarray(f[EMBEDDING_DATASET][:], dtype=np.float32).reshape(-1))
                if not first:
                    first = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        except (OSError, KeyError) as e:
            raise HistofmError(f"{p.name} is not a slide-embedding file with an 'embedding' dataset ({e}).") from None
        names.append(p.stem)
    if len({r.shape for r in rows}) != 1:
        raise HistofmError(f"The slide embeddings in {folder} have different sizes; embed all slides with one encoder.")
    return names, np.stack(rows), first


@dataclass
class SlideEmbedReport:
    """Per-slide outcome of :func:`embed_feature_dir`."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (slide, one-sentence error)


def embed_feature_dir(
    feature_files: Sequence[str | os.PathLike[str]],
    encoder: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    tile_size: float | None = None,
    device: str | torch.device | None = None,
    any_tile_encoder: bool = False,
    overwrite: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> SlideEmbedReport:
    """Embed every feature file into ``out_dir``; existing outputs are skipped unless ``overwrite``.

    A slide that fails is recorded in the report and the others go on.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    name = str(getattr(encoder, "histofm_name", type(encoder).__name__))
    report = SlideEmbedReport()
    files = [Path(f) for f in feature_files]
    with Progress(TextColumn("slide embeddings"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("embed", total=len(files))
        for path in files:
            target = Path(out_dir) / f"{path.stem}.h5"
            if target.exists() and not overwrite:
                report.skipped.append(path.stem)
                bar.advance(task)
                continue
            try:
                features, coords, attrs = read_features(path)
                emb, step = _embed(path, features, coords, attrs, encoder, tile_size, device, any_tile_encoder)
                meta = {
                    "tile_encoder": str(attrs.get("model_name", "")),
                    "num_tiles": int(len(coords)),
                    "tile_size_level0": step,
                    "mpp": float(attrs.get("mpp", float("nan"))),
                    "checkpoint": Path(checkpoint).name if checkpoint else "",
                }
                report.written.append(write_slide_embedding(out_dir, path.stem, emb, slide_encoder=name,
                                                            source=path, attrs=meta))
            except HistofmError as e:
                report.failures.append((path.stem, str(e)))
            bar.advance(task)
    return report
