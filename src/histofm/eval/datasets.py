"""Readers for the tile-classification datasets people bring: ImageFolder, PCam HDF5, MedMNIST ``.npz``.

Every dataset returns ``(image, label)`` with ``image`` a uint8 ``(H, W, 3)`` tensor
(grey images are repeated to three channels) unless a ``transform`` is given, in
which case the transform receives a PIL image (torchvision-style). They index
lazily, so large files are not loaded into memory.

* ImageFolder: ``root/<class name>/<image>``, classes sorted by name (torchvision's layout).
* PatchCamelyon (Veeling et al. 2018, arXiv 1806.03962):
  ``camelyonpatch_level_2_split_{train,valid,test}_x.h5`` with ``x (N, 96, 96, 3)``
  uint8 and ``..._y.h5`` with ``y (N, 1, 1, 1)``; label 1 = tumour in the centre 32 x 32.
* MedMNIST (Yang et al. 2023, arXiv 2110.14795): one ``.npz`` with
  ``{train,val,test}_images`` ``(N, H, W)`` or ``(N, H, W, 3)`` and
  ``{train,val,test}_labels`` ``(N, 1)`` (single-label tasks).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from histofm.errors import HistofmError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def _to_item(array: np.ndarray, transform: Callable[[Image.Image], Any] | None) -> Any:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if transform is not None:
        return transform(Image.fromarray(np.ascontiguousarray(array)))
    return torch.from_numpy(np.array(array, copy=True))  # own, writable memory


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` tiles; ``classes`` are the sorted sub-directory names."""

    def __init__(self, root: str | os.PathLike[str], transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise HistofmError(f"Image folder not found: {self.root}.")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise HistofmError(f"{self.root} has no class sub-directories; expected root/<class>/<image> files.")
        self.samples = [
            (p, i)
            for i, c in enumerate(self.classes)
            for p in sorted((self.root / c).rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        ]
        if not self.samples:
            raise HistofmError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}.")
        self.labels = np.array([label for _, label in self.samples])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        from histofm.data.datasets import load_rgb

        array = np.asarray(load_rgb(path))  # every decoder failure becomes one sentence naming the file
        return _to_item(array, self.transform), label


class PCamDataset(Dataset):
    """PatchCamelyon split from its pair of HDF5 files in ``root``."""

    def __init__(
        self, root: str | os.PathLike[str], split: str = "train", transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        import h5py

        if split not in ("train", "valid", "test"):
            raise HistofmError(f"PCam split must be train, valid or test, got {split!r}.")
        root = Path(root)
        self.x_path = root / f"camelyonpatch_level_2_split_{split}_x.h5"
        self.y_path = root / f"camelyonpatch_level_2_split_{split}_y.h5"
        for p in (self.x_path, self.y_path):
            if not p.is_file():
                raise HistofmError(f"PCam file not found: {p}; download the {split} split (x and y .h5 files) there.")
        try:
            with h5py.File(self.x_path, "r") as fx, h5py.File(self.y_path, "r") as fy:
                shape = fx["x"].shape
                self.labels = np.asarray(fy["y"][:]).reshape(-1).astype(np.int64)
        except (OSError, KeyError) as e:
            raise HistofmError(f"{self.x_path.name} / {self.y_path.name} are not PCam files with 'x' and 'y' ({e}).") from None
        if len(shape) != 4 or shape[-1] != 3 or shape[0] != len(self.labels):
            raise HistofmError(f"PCam 'x' must be (N, 96, 96, 3) with one label each, got {shape} and {len(self.labels)} labels.")
        self.transform = transform
        self.classes = ["normal", "tumour"]
        self._file: Any = None  # opened lazily in each DataLoader worker

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.x_path, "r")
        return _to_item(np.asarray(self._file["x"][i]), self.transform), int(self.labels[i])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}  # h5py handles do not pickle into workers


class MedMNISTDataset(Dataset):
    """One split of a MedMNIST ``.npz`` file (e.g. ``pathmnist.npz``)."""

    def __init__(
        self, path: str | os.PathLike[str], split: str = "train", transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        path = Path(path)
        if split not in ("train", "val", "test"):
            raise HistofmError(f"MedMNIST split must be train, val or test, got {split!r}.")
        if not path.is_file():
            raise HistofmError(f"MedMNIST file not found: {path}.")
        try:
            data = np.load(path)
            self.images = data[f"{split}_images"]
            labels = data[f"{split}_labels"]
        except (OSError, ValueError, KeyError) as e:
            raise HistofmError(f"{path.name} is not a MedMNIST .npz with {split}_images and {split}_labels ({e}).") from None
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise HistofmError(f"{path.name} is multi-label ({labels.shape[1]} labels per image); only single-label tasks are read.")
        self.labels = labels.reshape(-1).astype(np.int64)
        if self.images.ndim not in (3, 4) or len(self.images) != len(self.labels):
            raise HistofmError(f"{path.name}: images {self.images.shape} do not match {len(self.labels)} labels.")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return _to_item(np.asarray(self.images[i]), self.transform), int(self.labels[i])


def load_arrays(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """All images of a dataset (without transform) as one uint8 ``(N, H, W, 3)`` tensor and labels ``(N,)``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    items = [dataset[i] for i in range(n)]
    shapes = {tuple(x.shape) for x, _ in items}
    if len(shapes) > 1:
        raise HistofmError(f"Images differ in size {sorted(shapes)[:3]}; give a transform that resizes them.")
    return torch.stack([x for x, _ in items]), np.array([y for _, y in items])
