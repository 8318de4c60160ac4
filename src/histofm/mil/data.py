"""The inputs of slide-level learning: the labels table and bags of tile features read lazily.

* :func:`read_labels_csv` reads ``slide_id, label[, patient_id]`` (classification) or
  ``slide_id, <time>, <event>[, patient_id]`` (survival) rows.
* :class:`BagDataset` opens a slide's HDF5 file each time a bag is asked for, so memory
  holds one batch of bags, not the cohort (``benchmarks/mil_memory.py`` measures it).
* :func:`find_features` matches a ``slide_id`` with or without its extension
  (``S01``, ``S01.svs`` and ``S01.h5`` all find ``S01.h5``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofm.errors import HistofmError
from histofm.tables import Row, read_csv_table

FEATURE_EXTENSIONS = (".h5", ".hdf5")


@dataclass(frozen=True)
class SlideTable:
    """The labels CSV: one row per slide.

    Attributes:
        slide_ids: as written in the CSV.
        labels: ``(n,)`` int class indices (classification) or event indicators (survival,
            used to stratify folds).
        patients: patient of each slide (defaults to the slide).
        class_names: class names in index order (classification); empty for survival.
        times: ``(n,)`` follow-up times (survival) or ``None``.
        events: ``(n,)`` bool, True for an observed event (survival) or ``None``.
    """

    slide_ids: list[str]
    labels: np.ndarray
    patients: list[str]
    class_names: list[str]
    times: np.ndarray | None = None
    events: np.ndarray | None = None

    @property
    def task(self) -> str:
        return "survival" if self.times is not None else "classification"


def _rows(path: Path, needed: Sequence[str], flag: str) -> list[Row]:
    """The rows of the labels CSV, read by the one CSV reader (header required; blank values refused)."""
    rows = read_csv_table(path, required=needed, optional=("patient_id",), flag=flag, header=True).rows
    seen: set[str] = set()
    for r in rows:
        if r["slide_id"] in seen:
            raise HistofmError(f"Slide {r['slide_id']!r} appears twice in {path.name} (row {r.row}); "
                               "give each slide one row.")
        seen.add(r["slide_id"])
    return rows


def _class_order(values: list[str]) -> list[str]:
    def key(s: str) -> tuple[bool, float, str]:
        try:
            return (False, float(s), s)
        except ValueError:
            return (True, 0.0, s)

    return sorted(set(values), key=key)


def read_labels_csv(
    path: str | os.PathLike[str],
    task: str = "classification",
    time_col: str = "time",
    event_col: str = "event",
) -> SlideTable:
    """Read the labels table of a cohort.

    Args:
        path: CSV file.
        task: ``"classification"`` (column ``label``) or ``"survival"`` (columns ``time_col``, ``event_col``).
        time_col: follow-up time column (survival).
        event_col: event column, 1/0 or true/false (survival); 0 means censored.
    """
    path = Path(path)
    if task == "classification":
        rows = _rows(path, ("slide_id", "label"), "--labels")
        raw = [r["label"].strip() for r in rows]
        classes = _class_order(raw)
        if len(classes) < 2:
            raise HistofmError(f"{path.name} has a single label {classes[0]!r}; slide classification needs two or more.")
        labels = np.array([classes.index(v) for v in raw])
        times = events = None
    elif task == "survival":
        rows = _rows(path, ("slide_id", time_col, event_col), "--labels (column names: --time-col, --event-col)")
        try:
            times = np.array([float(r[time_col]) for r in rows])
        except ValueError:
            raise HistofmError(f"Column {time_col!r} of {path.name} must hold numbers (follow-up times).") from None
        truth = {"1": True, "0": False, "true": True, "false": False, "1.0": True, "0.0": False}
        bad = [r[event_col] for r in rows if r[event_col].strip().lower() not in truth]
        if bad:
            raise HistofmError(f"Column {event_col!r} of {path.name} must be 1/0 (event/censored), found {bad[0]!r}.")
        if (times < 0).any() or not np.isfinite(times).all():
            raise HistofmError(f"Column {time_col!r} of {path.name} has negative or missing times.")
        events = np.array([truth[r[event_col].strip().lower()] for r in rows])
        if not events.any():
            raise HistofmError(f"{path.name} has no observed event ({event_col} = 1); survival needs some.")
        labels, classes = events.astype(int), []
    else:
        raise HistofmError(f"Unknown task {task!r}; choose --task classification or --task survival.")
    ids = [r["slide_id"].strip() for r in rows]
    patients = [(r.get("patient_id") or r["slide_id"]).strip() for r in rows]
    return SlideTable(ids, labels, patients, classes, times, events)


def find_features(features_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """The features file of ``slide_id`` (with or without an extension) in ``features_dir``."""
    d = Path(features_dir)
    stems = [slide_id]
    if Path(slide_id).suffix:
        stems.append(Path(slide_id).stem)  # "S01.svs" -> "S01"
    for stem in stems:
        for ext in FEATURE_EXTENSIONS:
            if (d / f"{stem}{ext}").is_file():
                return d / f"{stem}{ext}"
        if stem.endswith(FEATURE_EXTENSIONS) and (d / stem).is_file():
            return d / stem
    raise HistofmError(f"No features file for slide {slide_id!r} in {d} (expected {Path(slide_id).stem}.h5).")


def read_bag(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """``features (N, D)``, ``coords (N, 2)`` (or ``None``) and the merged attributes of a features file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"Features file not found: {path}; run `histofm extract` first.")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise HistofmError(f"{path.name} has no 'features' dataset; is it a histofm/CLAM/TRIDENT features file?")
            feats = np.asarray(f["features"][:], dtype=np.float32)
            coords = np.asarray(f["coords"][:]) if "coords" in f else None
            attrs = {**(dict(f["coords"].attrs) if "coords" in f else {}), **dict(f.attrs)}
    except OSError as e:
        raise HistofmError(f"Cannot read {path.name} as HDF5 ({e}); the file may be truncated.") from None
    if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM writes (1, N, D) in some versions
        feats = feats[0]
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise HistofmError(f"{path.name}: 'features' must be a non-empty (N, D) array, got shape {feats.shape}.")
    check_finite(feats, path)
    if coords is not None and coords.shape != (feats.shape[0], 2):
        raise HistofmError(f"{path.name}: coords {coords.shape} do not match features {feats.shape}.")
    return feats, coords, attrs


def check_finite(feats: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Refuse features with NaN or infinite values, naming the slide's file."""
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=-1).sum())
        raise HistofmError(
            f"{Path(path).name} holds NaN or infinite features in {bad} tile(s); re-extract that slide "
            "(check the encoder weights) or drop it from --labels."
        )


def _feature_dim(path: Path) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise HistofmError(f"{path.name} has no 'features' dataset; is it a histofm/CLAM/TRIDENT features file?")
            return int(f["features"].shape[-1])
    except OSError as e:
        raise HistofmError(f"Cannot read {path.name} as HDF5 ({e}); the file may be truncated.") from None


class BagDataset(Sequence[torch.Tensor]):
    """Bags ``(N_i, D)`` float32 read from disk on each access; holds only the file paths.

    ``dataset[i]`` opens the i-th file, reads its features and closes it. A list of
    in-memory tensors works wherever a :class:`BagDataset` does (both are sequences).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        dims = {}
        for p in self.paths:  # read only the shape: a cheap check that all bags share D
            dims.setdefault(_feature_dim(p), p)
        if len(dims) > 1:
            (d1, p1), (d2, p2) = list(dims.items())[:2]
            raise HistofmError(
                f"Features files have different dimensions ({p1.name}: {d1}, {p2.name}: {d2}); use one encoder for all slides."
            )
        self.dim = next(iter(dims)) if dims else 0

    @classmethod
    def from_table(cls, features_dir: str | os.PathLike[str], slide_ids: Sequence[str]) -> BagDataset:
        """The bags of ``slide_ids``; every slide must have a features file."""
        if not Path(features_dir).is_dir():
            raise HistofmError(f"Features directory not found: {features_dir}; pass the folder of `histofm extract` as --features.")
        paths, missing = [], []
        for s in slide_ids:
            try:
                paths.append(find_features(features_dir, s))
            except HistofmError:
                missing.append(s)
        if missing:
            raise HistofmError(
                f"{len(missing)} slide(s) of the labels file have no features file in {features_dir}, "
                f"e.g. {missing[0]!r}; extract them or drop them from the CSV."
            )
        return cls(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return torch.from_numpy(read_bag(self.paths[i])[0])


class Subset(Sequence[torch.Tensor]):
    """A view of some bags of a sequence, without reading them."""

    def __init__(self, bags: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
        self.bags, self.indices = bags, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.bags[self.indices[i]]
