"""Tile datasets for pretraining: a folder of images, whole slides, or the bundled real samples.

Every dataset here yields RGB ``PIL.Image`` tiles (a method's view transform
turns them into tensors); datasets with known classes also expose ``labels``
(one int per tile) and ``classes``.

* :class:`ImageFolderTiles`: every image under a folder (recursively);
* :func:`slide_tiles`: tissue tiles of whole-slide images, read on the fly through
  :class:`histofm.wsi.dataset.SlideTileDataset`;
* :func:`bundled_tiles`: tiles cut from the real H&E samples shipped with the
  package (HGSC tumour nest, HGSC stroma, CMU-1 skin crop), in a grid or at
  seeded random positions, optionally restricted to a region of each image so a
  held-out region can serve as a test set;
* :func:`tile_dataset`: what ``histofm pretrain --data`` accepts (a folder, slide
  files, or ``bundled``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from histofm.data import sample_path
from histofm.errors import HistofmError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
BUNDLED_SOURCES = ("hgsc_nest", "hgsc_stroma", "cmu_small_region")
Region = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of width and height


class ImageFolderTiles(Dataset):
    """Every image file under ``root`` (recursively, sorted), as RGB PIL images.

    Args:
        root: a folder.
        recursive: also look in sub-folders.
        extensions: file suffixes to include (case-insensitive).

    ``labels``/``classes`` come from the first-level sub-folder names (ImageFolder layout);
    files directly in ``root`` get class ``""``.
    """

    def __init__(self, root: str | os.PathLike[str], *, recursive: bool = True, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise HistofmError(f"Image folder {self.root} does not exist or is not a folder.")
        exts = {e.lower() for e in extensions}
        pattern = "**/*" if recursive else "*"
        self.paths = sorted(p for p in self.root.glob(pattern) if p.is_file() and p.suffix.lower() in exts)
        if not self.paths:
            raise HistofmError(f"No images ({', '.join(sorted(exts))}) found in {self.root}.")
        names = [p.relative_to(self.root).parts[0] if len(p.relative_to(self.root).parts) > 1 else "" for p in self.paths]
        self.classes = sorted(set(names))
        self.labels = [self.classes.index(n) for n in names]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])


def load_rgb(path: Path) -> Image.Image:
    """Decode one image file to RGB, turning every decoder failure into one sentence naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError:
        raise HistofmError(
            f"Image {path} declares more pixels than Pillow will decode safely; replace it or cut it into tiles."
        ) from None
    except MemoryError:
        raise HistofmError(f"Image {path} needs more memory to decode than is available; replace it.") from None
    except Image.UnidentifiedImageError:
        raise HistofmError(f"Cannot read image {path}: it is not an image format Pillow knows; remove or replace it.") from None
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error ...
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160] if str(e) else type(e).__name__
        raise HistofmError(f"Cannot read image {path} ({reason}); it is probably truncated or corrupt, so remove or replace it.") from None


class _PILSlideTiles(Dataset):
    """A :class:`SlideTileDataset` that yields PIL tiles (so any view transform applies)."""

    def __init__(self, inner: Any) -> None:  # noqa: ANN401
        self.inner = inner
        self.labels = [int(np.searchsorted(inner.offsets, i, side="right") - 1) for i in range(len(inner))]
        self.classes = [p.stem for p in inner.paths]

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Image.Image:
        return self.inner.read_tile(index)


def slide_tiles(
    slides: Sequence[str | os.PathLike[str]],
    *,
    tile_size: int = 224,
    target_mpp: float = 0.5,
    min_tissue: float = 0.5,
    mpp: float | None = None,
) -> Dataset:
    """Tissue tiles of whole-slide images at ``target_mpp``, read lazily (safe with workers).

    ``labels`` holds the slide index of each tile, ``classes`` the slide names.
    """
    from histofm.wsi import open_slide, tile_slide  # lazy: the WSI stack is only needed here
    from histofm.wsi.dataset import SlideTileDataset

    if not slides:
        raise HistofmError("No slides given; pass at least one slide file.")
    coords = []
    for path in slides:
        with open_slide(path, mpp=mpp) as reader:
            coords.append(tile_slide(reader, target_mpp, tile_size, min_tissue=min_tissue))
    inner = SlideTileDataset(list(slides), coords, target_mpp=target_mpp, tile_size=tile_size, mpp=mpp, return_meta=False)
    return _PILSlideTiles(inner)


# ------------------------------------------------------------------ bundled samples
@functools.lru_cache(maxsize=4)
def _load_sample(name: str) -> np.ndarray:
    """A bundled sample as an RGB uint8 array ``(H, W, 3)`` (read once per process)."""
    path = sample_path(name)
    if path.suffix.lower() == ".svs":
        from histofm.wsi import open_slide

        with open_slide(path) as reader:
            return np.asarray(reader.read_region((0, 0), 0, reader.dimensions).convert("RGB"))
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of pixels that look like stained tissue, not white glass: HSV saturation > 0.07, value < 0.95."""
    mx = rgb.max(-1).astype(np.float32)
    mn = rgb.min(-1).astype(np.float32)
    return ((mx - mn) > 0.07 * np.maximum(mx, 1e-6)) & (mx < 0.95 * 255)


def tissue_fraction(tile: np.ndarray) -> float:
    """Fraction of tissue pixels (see :func:`tissue_pixels`) in an RGB uint8 tile ``(H, W, 3)``."""
    return float(tissue_pixels(tile).mean())


@functools.lru_cache(maxsize=4)
def _tissue_integral(name: str) -> np.ndarray:
    """Summed-area table of the tissue mask of a bundled sample ``(H + 1, W + 1)``."""
    mask = tissue_pixels(_load_sample(name)).astype(np.int64)
    return np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))


class BundledTiles(Dataset):
    """Tiles cut from the bundled real samples; see :func:`bundled_tiles`.

    Attributes:
        classes: the source names; ``labels[i]`` is the source index of tile ``i``.
        coords: ``(N, 2)`` top-left ``(x, y)`` of each tile in its source image.
    """

    def __init__(self, sources: Sequence[str], labels: list[int], coords: np.ndarray, tile_size: int, out_size: int | None) -> None:
        self.classes = list(sources)
        self.labels = labels
        self.coords = coords
        self.tile_size, self.out_size = tile_size, out_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Image.Image:
        arr = _load_sample(self.classes[self.labels[index]])
        x, y = (int(v) for v in self.coords[index])
        s = self.tile_size
        img = Image.fromarray(arr[y : y + s, x : x + s])
        if self.out_size is not None and self.out_size != s:
            img = img.resize((self.out_size, self.out_size), Image.Resampling.BILINEAR)
        return img


def bundled_tiles(
    tile_size: int = 64,
    *,
    sources: Sequence[str] = BUNDLED_SOURCES,
    mode: str = "grid",
    stride: int | None = None,
    num_per_source: int = 256,
    region: Region = (0.0, 0.0, 1.0, 1.0),
    min_tissue: float = 0.5,
    out_size: int | None = None,
    seed: int = 0,
) -> BundledTiles:
    """Tiles from the real H&E samples bundled with histofm (no download).

    Sources: ``hgsc_nest`` (1500 x 1500, ovarian carcinoma tumour nest), ``hgsc_stroma``
    (1500 x 1500, stroma), ``cmu_small_region`` (2220 x 2967 Aperio crop of skin, with
    white background that the tissue filter removes); all about 0.5 um/px.

    Args:
        tile_size: tile side in source pixels.
        sources: which samples to cut from.
        mode: ``"grid"`` (every ``stride`` pixels) or ``"random"`` (``num_per_source`` seeded
            positions per source).
        stride: grid step (default: ``tile_size``, no overlap).
        num_per_source: tiles per source in random mode.
        region: ``(x0, y0, x1, y1)`` fractions of each image; tiles lie entirely inside it.
            Use complementary regions for a train/test split that never shares pixels.
        min_tissue: drop tiles whose :func:`tissue_fraction` is lower.
        out_size: resize tiles to this side (e.g. cut 64 px, train at 32 px).
        seed: positions in random mode.
    """
    unknown = [s for s in sources if s not in BUNDLED_SOURCES]
    if unknown:
        raise HistofmError(f"Unknown bundled source(s) {', '.join(unknown)}; choose from {', '.join(BUNDLED_SOURCES)}.")
    if mode not in ("grid", "random"):
        raise HistofmError(f"mode must be 'grid' or 'random', got {mode!r}.")
    x0f, y0f, x1f, y1f = region
    if not (0 <= x0f < x1f <= 1 and 0 <= y0f < y1f <= 1):
        raise HistofmError(f"region must be (x0, y0, x1, y1) fractions with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {region}.")
    if tile_size < 4:
        raise HistofmError(f"tile_size must be at least 4 pixels, got {tile_size}.")
    rng = np.random.default_rng(seed)
    labels: list[int] = []
    coords: list[tuple[int, int]] = []
    for label, name in enumerate(sources):
        arr = _load_sample(name)
        h, w = arr.shape[:2]
        x0, y0, x1, y1 = int(x0f * w), int(y0f * h), int(x1f * w), int(y1f * h)
        if x1 - x0 < tile_size or y1 - y0 < tile_size:
            raise HistofmError(f"The region {region} of {name} ({w} x {h}) is smaller than one {tile_size} px tile.")
        if mode == "grid":
            step = stride or tile_size
            cand = [(x, y) for y in range(y0, y1 - tile_size + 1, step) for x in range(x0, x1 - tile_size + 1, step)]
        else:
            n_try = num_per_source * 4
            xs = rng.integers(x0, x1 - tile_size + 1, n_try)
            ys = rng.integers(y0, y1 - tile_size + 1, n_try)
            cand = list(zip(xs.tolist(), ys.tolist()))
        sat = _tissue_integral(name)
        s = tile_size
        kept = 0
        for x, y in cand:
            frac = (sat[y + s, x + s] - sat[y, x + s] - sat[y + s, x] + sat[y, x]) / (s * s)
            if min_tissue > 0 and frac < min_tissue:
                continue
            labels.append(label)
            coords.append((x, y))
            kept += 1
            if mode == "random" and kept == num_per_source:
                break
    if not labels:
        raise HistofmError("No bundled tile passed the tissue filter; lower min_tissue or enlarge the region.")
    return BundledTiles(sources, labels, np.asarray(coords, dtype=np.int64), tile_size, out_size)


class CaptionedImages(Dataset):
    """``(image, caption)`` pairs listed in a CSV file with columns ``image`` and ``caption``.

    Image paths are relative to the CSV's folder (or absolute). For CLIP-style pretraining.
    """

    def __init__(self, csv_path: str | os.PathLike[str]) -> None:
        import csv

        self.path = Path(csv_path)
        if not self.path.is_file():
            raise HistofmError(f"Caption file {self.path} does not exist.")
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise HistofmError(f"{self.path} needs a header with columns 'image' and 'caption'.")
            rows = [(r["image"], r["caption"]) for r in reader]
        if not rows:
            raise HistofmError(f"{self.path} lists no images.")
        self.items = [((self.path.parent / img).resolve(), cap) for img, cap in rows]
        missing = [str(p) for p, _ in self.items if not p.is_file()]
        if missing:
            raise HistofmError(f"{len(missing)} image(s) listed in {self.path} do not exist, e.g. {missing[0]}.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        path, caption = self.items[index]
        return load_rgb(path), caption


# ------------------------------------------------------------------------ CLI entry
def tile_dataset(
    data: str | os.PathLike[str],
    *,
    tile_size: int = 224,
    target_mpp: float = 0.5,
    min_tissue: float = 0.5,
    mpp: float | None = None,
) -> Dataset:
    """What ``histofm pretrain --data`` accepts (``mpp``: level-0 override for slides, ``--mpp-override``).

    * ``"bundled"``: :func:`bundled_tiles` (grid tiles of ``tile_size`` from all bundled samples);
    * a shard folder (with ``index.json``, from ``histofm shard``): a streaming
      :class:`~histofm.data.shards.ShardStream` (tiles as stored; ``tile_size`` and ``target_mpp`` unused);
    * a slide file (``.svs``, ``.ndpi``, ``.mrxs`` ...) or a folder holding slide files:
      :func:`slide_tiles` at ``target_mpp``;
    * a folder of images (searched recursively): :class:`ImageFolderTiles`;
    * a ``.csv`` file of ``image,caption`` rows, or a folder holding ``captions.csv``:
      :class:`CaptionedImages` (for CLIP).
    """
    if str(data) == "bundled":
        return bundled_tiles(tile_size, min_tissue=min_tissue)
    path = Path(data)
    if not path.exists():
        raise HistofmError(f"Data path {path} does not exist; give a folder of images, slide files, or 'bundled'.")
    if path.is_dir() and (path / "index.json").is_file():
        from histofm.data.shards import ShardStream

        return ShardStream(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return CaptionedImages(path)
    if path.is_dir() and (path / "captions.csv").is_file():
        return CaptionedImages(path / "captions.csv")
    if path.is_file():
        if path.suffix.lower() in SLIDE_EXTENSIONS or path.suffix.lower() in (".tif", ".tiff"):
            return slide_tiles([path], tile_size=tile_size, target_mpp=target_mpp, min_tissue=min_tissue, mpp=mpp)
        raise HistofmError(f"{path} is neither a slide file nor a folder; give a folder of images, slide files, or 'bundled'.")
    slides = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
    if slides:
        return slide_tiles(slides, tile_size=tile_size, target_mpp=target_mpp, min_tissue=min_tissue, mpp=mpp)
    return ImageFolderTiles(path)
