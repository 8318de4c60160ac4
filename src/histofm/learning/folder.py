"""A folder of tile images plus a CSV that labels a few of them, loaded for semi-supervised training.

The CSV has two columns, ``path`` (relative to the folder) and ``label``; a
header row ``path,label`` is optional. Every image under the folder that the CSV
does not name is unlabelled. Images are resized (shorter side) and centre
cropped to ``img_size`` and held in memory as ``uint8``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histofm.errors import HistofmError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass
class LabelledFolder:
    """Images of a folder split into labelled and unlabelled ones.

    Attributes:
        x_l, y_l, paths_l: labelled images ``(N_l, 3, S, S)`` uint8, labels, relative paths.
        x_u, paths_u: unlabelled images and their relative paths.
        classes: sorted class names; ``y_l`` indexes them.
    """

    x_l: torch.Tensor
    y_l: torch.Tensor
    paths_l: list[str]
    x_u: torch.Tensor
    paths_u: list[str]
    classes: tuple[str, ...]


def read_label_csv(path: str | os.PathLike[str], flag: str = "--labels") -> list[tuple[str, str]]:
    """``(relative path, label)`` rows of a label CSV (header ``path,label`` optional, blank lines skipped).

    Read by the one CSV reader, :func:`histofm.tables.read_csv_table`: a byte-order mark is
    dropped, another encoding or a binary file is refused, and a blank path or label is refused
    with its row number (a blank label never becomes a class).
    """
    from histofm.tables import read_csv_table

    table = read_csv_table(path, required=("path", "label"), flag=flag)
    if not table.rows:
        raise HistofmError(f"{table.path.name} labels no image; add rows 'path,label' to the file given to {flag}.")
    return [(row["path"], row["label"]) for row in table.rows]


def load_image(path: Path, size: int) -> np.ndarray:
    """An RGB image resized (shorter side) and centre-cropped to ``size``: ``(size, size, 3)`` uint8."""
    from histofm.data.datasets import load_rgb

    im = load_rgb(path)  # every decoder failure becomes one sentence naming the file
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _stack(folder: Path, rels: list[str], size: int) -> torch.Tensor:
    if not rels:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack([load_image(folder / r, size) for r in rels])).permute(0, 3, 1, 2).contiguous()


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_labelled_folder(
    folder: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    img_size: int,
    exclude: set[str] | None = None,
    classes: tuple[str, ...] | None = None,
    labels_flag: str = "--labels",
) -> LabelledFolder:
    """Load ``folder``'s images, labelled as ``labels`` says.

    Args:
        folder: directory of images (searched recursively).
        labels: CSV of ``path,label`` rows, paths relative to ``folder``.
        img_size: side of the square images in memory.
        exclude: relative paths to leave out entirely (a held-out test set).
        classes: fix the class list (for a test CSV that must use the training classes).
        labels_flag: the flag that gave ``labels``, named in messages about the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HistofmError(f"Image folder not found: {folder}; give the directory that holds the tiles.")
    if img_size < 8:
        raise HistofmError(f"The image size must be at least 8 pixels, got {img_size}.")
    rows = read_label_csv(labels, labels_flag)
    all_images = set(list_images(folder))
    missing = [p for p, _ in rows if Path(p).as_posix() not in all_images]
    if missing:
        raise HistofmError(f"{len(missing)} labelled image(s) are not images under {folder}, e.g. {missing[0]!r}; "
                           "paths in the CSV must be relative to the folder.")
    labelled: dict[str, str] = {}
    for p, lab in rows:
        p = Path(p).as_posix()
        if labelled.get(p, lab) != lab:
            raise HistofmError(f"{p!r} is labelled twice with different labels ({labelled[p]!r}, {lab!r}).")
        labelled[p] = lab
    names = tuple(sorted(set(labelled.values())))
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise HistofmError(f"Label {unknown[0]!r} is not one of the training classes {', '.join(classes)}.")
        names = classes
    elif len(names) < 2:
        raise HistofmError(f"All labelled images have the label {names[0]!r}; label at least two classes.")
    exclude = exclude or set()
    paths_l = sorted(labelled)
    paths_u = sorted(all_images - set(paths_l) - exclude)
    index = {c: i for i, c in enumerate(names)}
    return LabelledFolder(
        x_l=_stack(folder, paths_l, img_size),
        y_l=torch.tensor([index[labelled[p]] for p in paths_l], dtype=torch.long),
        paths_l=paths_l,
        x_u=_stack(folder, paths_u, img_size),
        paths_u=paths_u,
        classes=names,
    )
