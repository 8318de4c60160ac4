"""Tissue-phenotype maps: cluster a slide's tile embeddings and paint the clusters on its thumbnail.

Without any labels, tiles whose foundation-model embeddings are close tend to
show the same tissue (epidermis, dermis, fat, tumour, inflammation ...). This
module embeds the tissue tiles of a slide (through :mod:`histofm.wsi`), or reads
a feature file that :func:`histofm.wsi.features.extract_features` (or CLAM /
TRIDENT) wrote, runs :func:`~histofm.learning.unsupervised.kmeans` on the
L2-normalised embeddings (cosine geometry, the one SSL embeddings are trained
in), and writes:

* ``<slide>_clusters.png``: the thumbnail beside the same thumbnail with each tile
  filled in its cluster's colour, with a legend of tile counts;
* ``<slide>_prototypes.png``: for each cluster, the tiles nearest its centroid
  (what a pathologist looks at to name the phenotype);
* ``<slide>_clusters.csv`` and ``<slide>_clusters.h5``: ``x, y, cluster, distance`` per tile
  (level-0 corner; the HDF5 has ``coords (N, 2)``, ``cluster (N,)``, ``distance (N,)``);
* ``<slide>_clusters.geojson``: the tiles as QuPath objects classified ``cluster j`` in the
  map's colours, with the distance to the centroid as a measurement (:mod:`histofm.wsi.qupath`).

Clusters are numbered by size, largest first, so colours are stable across runs.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histofm.errors import HistofmError
from histofm.learning.unsupervised import kmeans, prototypes
from histofm.utils import atomic_path

_PALETTE = [  # matplotlib's tab10, as 0-255 RGB
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


def cluster_colour(j: int) -> tuple[int, int, int]:
    """RGB colour of cluster ``j`` (tab10, then a deterministic pseudo-random colour)."""
    if j < len(_PALETTE):
        return _PALETTE[j]
    rng = np.random.default_rng(j)
    return tuple(int(v) for v in rng.integers(40, 220, 3))  # type: ignore[return-value]


@dataclass
class ClusterMap:
    """Result of :func:`cluster_map`.

    Attributes:
        coords: ``(N, 2)`` level-0 top-left ``(x, y)`` of each tile.
        labels: ``(N,)`` cluster of each tile (0 = largest cluster).
        distances: ``(N,)`` squared distance of each (normalised) embedding to its centroid.
        centroids: ``(K, D)`` centroids in the clustered (normalised) space.
        inertia: k-means objective.
        size_level0: tile side in level-0 pixels.
        prototype_indices: per cluster, tile indices nearest the centroid.
        paths: output files by kind (``"map"``, ``"prototypes"``, ``"csv"``, ``"features"``).
    """

    coords: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    centroids: np.ndarray
    inertia: float
    size_level0: float
    prototype_indices: list[np.ndarray]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def counts(self) -> np.ndarray:
        """Tiles per cluster."""
        return np.bincount(self.labels, minlength=len(self.centroids))


def _tile_size_level0(attrs: dict[str, Any], slide: Any) -> float:
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"])
    if {"tile_size", "mpp", "level0_mpp"} <= attrs.keys():
        return float(attrs["tile_size"]) * float(attrs["mpp"]) / float(attrs["level0_mpp"])
    if "patch_size" in attrs and "patch_level" in attrs:  # CLAM: patch_size pixels read at patch_level
        return float(attrs["patch_size"]) * float(slide.level_downsamples[int(attrs["patch_level"])])
    raise HistofmError(
        "The feature file does not say how large its tiles are (no patch_size_level0, tile_size/mpp or "
        "patch_size/patch_level attributes); extract it with `histofm extract`."
    )


def _extract(slide_path: Path, model: str | nn.Module, checkpoint: str | os.PathLike[str] | None, out_dir: Path,
             cfg: Any, mpp: float | None, progress: bool) -> Path:
    from histofm.registry import load_checkpoint
    from histofm.weights import load_encoder
    from histofm.wsi.features import extract_features

    if isinstance(model, str):  # never random weights by accident: a name needs its checkpoint
        model = load_encoder(model, checkpoint=checkpoint)
    elif checkpoint is not None:
        load_checkpoint(model, checkpoint)
    report = extract_features([slide_path], model, out_dir, config=cfg, mpp=mpp, progress=progress)
    if report.failures:
        raise HistofmError(f"Feature extraction failed for {slide_path.name}: {report.failures[0].error}")
    return out_dir / f"{slide_path.stem}.h5"


def cluster_map(
    slide: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str | nn.Module | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    features: str | os.PathLike[str] | None = None,
    k: int = 4,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.5,
    batch_size: int = 64,
    normalize: bool = True,
    n_prototypes: int = 6,
    seed: int = 0,
    device: str | None = None,
    mpp: float | None = None,
    max_size: int = 1024,
    progress: bool = True,
) -> ClusterMap:
    """Cluster a slide's tiles by embedding and save the cluster map, prototypes and a CSV.

    Args:
        slide: the whole-slide image (or a plain image with ``mpp``).
        out_dir: output directory.
        model: a registered model name or a module ``(B, 3, S, S) -> (B, D)``; needed unless
            ``features`` is given. A name without ``checkpoint`` is refused (random weights only
            when you build the module yourself).
        checkpoint: weights for ``model``.
        features: an existing feature file (``features``, ``coords``) of this slide; skips extraction.
        k: number of clusters.
        target_mpp, tile_size, min_tissue, batch_size: tiling and extraction settings.
        normalize: L2-normalise embeddings before k-means (cosine geometry).
        n_prototypes: tiles shown per cluster.
        seed: k-means seed.
        device: where to embed and cluster (default: the best available).
        mpp: level-0 mpp override for slides without metadata.
        max_size: longer side of the thumbnail in pixels.
        progress: show progress bars during extraction.

    Returns:
        A :class:`ClusterMap`; ``result.paths`` lists the files written.
    """
    from histofm.utils import default_device
    from histofm.wsi import open_slide
    from histofm.wsi.features import ExtractConfig, read_features

    slide_path = Path(slide)
    out = Path(out_dir)
    if k < 1:
        raise HistofmError(f"The number of clusters must be at least 1, got {k}.")
    dev = device or str(default_device())
    reader = open_slide(slide_path, mpp=mpp)
    try:
        if features is None:
            if model is None:
                raise HistofmError("Give a model (--model NAME) to embed the tiles, or a feature file (--features).")
            cfg = ExtractConfig(target_mpp=target_mpp, tile_size=tile_size, min_tissue=min_tissue,
                                batch_size=batch_size, device=dev)
            features = _extract(slide_path, model, checkpoint, out, cfg, mpp, progress)
        feats, coords, attrs = read_features(features)
        size0 = _tile_size_level0(attrs, reader)
        w0, h0 = reader.dimensions
        if len(coords) and ((coords < 0).any() or coords[:, 0].max() >= w0 or coords[:, 1].max() >= h0):
            raise HistofmError(
                f"The tiles of {Path(features).name} lie outside {slide_path.name} ({w0} x {h0}); "
                "pass the feature file of this slide."
            )
        if len(feats) < k:
            raise HistofmError(f"{slide_path.name} has {len(feats)} tissue tiles, fewer than k = {k}; lower --k.")
        x = torch.from_numpy(feats)
        if normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        res = kmeans(x, k, seed=seed, device=dev)
        # Renumber clusters by size, largest first, so colours do not depend on the seed's order.
        counts = torch.bincount(res.labels, minlength=k).cpu()
        order = torch.argsort(-counts, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(k)
        res.labels = rank.to(res.labels.device)[res.labels]
        res.centroids = res.centroids[order.to(res.centroids.device)]
        dist = ((x.to(res.centroids) - res.centroids[res.labels]) ** 2).sum(1)
        protos = [p.cpu().numpy() for p in prototypes(x, res, n_prototypes)]
        result = ClusterMap(
            coords=coords, labels=res.labels.cpu().numpy(), distances=dist.cpu().numpy(),
            centroids=res.centroids.cpu().numpy(), inertia=res.inertia, size_level0=size0,
            prototype_indices=protos, paths={"features": Path(features)},
        )
        stem = slide_path.stem
        result.paths["map"] = save_cluster_map(reader, result, out / f"{stem}_clusters.png", max_size=max_size,
                                               title=f"{stem}: k-means, k = {k}, {len(coords)} tiles")
        tile_mpp = float(attrs.get("mpp", target_mpp))
        tile_px = int(attrs.get("tile_size", tile_size))
        result.paths["prototypes"] = save_prototypes(reader, result, out / f"{stem}_prototypes.png", tile_px, tile_mpp)
        result.paths["csv"] = save_cluster_csv(result, out / f"{stem}_clusters.csv")
        result.paths["h5"] = save_cluster_h5(result, out / f"{stem}_clusters.h5", stem)
        result.paths["geojson"] = save_cluster_geojson(result, out / f"{stem}_clusters.geojson", stem)
    finally:
        reader.close()
    return result


def overlay(reader: Any, result: ClusterMap, max_size: int = 1024, alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(thumbnail, overlay)`` as ``uint8`` arrays: each tile blended with its cluster colour."""
    thumb = np.asarray(reader.thumbnail(max_size).convert("RGB"), dtype=np.float32)
    w0, h0 = reader.dimensions
    sx, sy = thumb.shape[1] / w0, thumb.shape[0] / h0
    colour = np.zeros_like(thumb)
    weight = np.zeros(thumb.shape[:2], dtype=np.float32)
    for (x, y), j in zip(result.coords, result.labels):
        x0, y0 = int(round(x * sx)), int(round(y * sy))
        x1, y1 = int(round((x + result.size_level0) * sx)), int(round((y + result.size_level0) * sy))
        colour[y0:y1, x0:x1] = cluster_colour(int(j))
        weight[y0:y1, x0:x1] = alpha
    over = thumb * (1 - weight[..., None]) + colour * weight[..., None]
    return thumb.astype(np.uint8), over.round().astype(np.uint8)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_cluster_map(reader: Any, result: ClusterMap, path: Path, max_size: int = 1024, title: str = "") -> Path:
    """Thumbnail and cluster overlay side by side, with a legend; saved as PNG atomically."""
    from matplotlib.patches import Patch

    thumb, over = overlay(reader, result, max_size)
    h, w = thumb.shape[:2]
    scale = 6.0 / max(h, w)
    fig = _figure(2 * w * scale + 2.2, h * scale + 0.6)
    for i, (img, name) in enumerate(((thumb, "thumbnail"), (over, "clusters"))):
        ax = fig.add_axes((0.01 + i * 0.41, 0.02, 0.4, 0.88))
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    counts = result.counts
    handles = [Patch(color=np.array(cluster_colour(j)) / 255, label=f"cluster {j} ({counts[j]} tiles)")
               for j in range(len(counts))]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def save_prototypes(reader: Any, result: ClusterMap, path: Path, tile_size: int, target_mpp: float,
                    show_px: int = 96) -> Path:
    """A grid: one row per cluster, its tiles nearest the centroid (nearest first)."""
    k = len(result.prototype_indices)
    n = max(1, max((len(p) for p in result.prototype_indices), default=1))
    fig = _figure(1.2 + 1.1 * n, 0.2 + 1.1 * k)
    axes = fig.subplots(k, n, squeeze=False)
    fig.subplots_adjust(left=1.1 / (1.2 + 1.1 * n), right=0.99, top=0.98, bottom=0.02, wspace=0.05, hspace=0.08)
    for j, idx in enumerate(result.prototype_indices):
        colour = np.array(cluster_colour(j)) / 255
        for c in range(n):
            ax = axes[j, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(idx):
                x, y = (int(v) for v in result.coords[idx[c]])
                tile = reader.read_region_mpp(x, y, tile_size, target_mpp).resize((show_px, show_px))
                ax.imshow(np.asarray(tile))
                for spine in ax.spines.values():
                    spine.set_color(colour)
                    spine.set_linewidth(3)
            else:
                ax.axis("off")
        axes[j, 0].text(-0.08, 0.5, f"cluster {j}", color=colour, fontsize=9, ha="right", va="center",
                        transform=axes[j, 0].transAxes)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def save_cluster_csv(result: ClusterMap, path: Path) -> Path:
    """``x, y, cluster, distance`` per tile."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "cluster", "distance"])
        for (x, y), j, d in zip(result.coords, result.labels, result.distances):
            w.writerow([int(x), int(y), int(j), f"{float(d):.6g}"])
    return path


def save_cluster_h5(result: ClusterMap, path: Path, slide: str = "") -> Path:
    """``coords (N, 2)`` level-0 corners, ``cluster (N,)``, ``distance (N,)`` and ``centroids (K, D)``."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=np.asarray(result.coords, dtype=np.int64))
            f.create_dataset("cluster", data=np.asarray(result.labels, dtype=np.int64))
            f.create_dataset("distance", data=np.asarray(result.distances, dtype=np.float32))
            f.create_dataset("centroids", data=np.asarray(result.centroids, dtype=np.float32))
            f.attrs["patch_size_level0"] = float(result.size_level0)
            f.attrs["slide"] = slide
    return path


def save_cluster_geojson(result: ClusterMap, path: Path, slide: str = "", object_type: str = "tile") -> Path:
    """The tiles as a QuPath FeatureCollection, classified ``cluster j`` in the map's colours."""
    from histofm.wsi.qupath import tile_features, write_geojson

    k = len(result.centroids)
    colours = {f"cluster {j}": list(cluster_colour(j)) for j in range(k)}
    names = [f"cluster {int(j)}" for j in result.labels]
    collection = tile_features(result.coords, result.size_level0, names, colours,
                               {"distance": result.distances}, object_type, id_prefix=slide)
    return write_geojson(path, collection)
