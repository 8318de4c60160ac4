"""Provenance of a feature file: everything that decides its numbers, stored as HDF5 file attributes.

A feature file is only reusable when we know what made it. Each file written by
:func:`histofm.wsi.features.extract_features` carries these attributes (stable keys,
documented in ``docs/wsi.md``; :func:`read_provenance` returns them as a dict, read by
:func:`read_attributes`, the one reader of feature-file attributes, ours and CLAM's / TRIDENT's):

========================  =====================================================================
group                     keys
========================  =====================================================================
model                     ``model_name``, ``embed_dim``
weights                   ``weights_source`` (``checkpoint`` / ``hub`` / ``random-init`` /
                          ``unrecorded``), ``weights_file``, ``weights_sha256``,
                          ``weights_repo``, ``weights_revision``
preprocessing             ``preprocess_resize`` (side the model sees), ``preprocess_interpolation``,
                          ``preprocess_mean``, ``preprocess_std`` (3 floats each),
                          ``preprocess_stain_norm`` (``none`` or ``method:target``)
tiling                    ``mpp`` (target), ``tile_size``, ``overlap``, ``min_tissue``, ``level``
                          (level read), ``read_size`` (pixels read there), ``tiles_from``
                          (``tissue`` or the coordinates file and its SHA-256), ``roi``
slide                     ``slide`` (file name), ``slide_bytes``, ``level0_mpp``,
                          ``slide_fingerprint``
software                  ``histofm_version``, ``layout``
========================  =====================================================================

The slide fingerprint is ``sha256(size as 8 little-endian bytes + first MiB + last MiB)``:
two reads whatever the slide's size, and it changes when a file is replaced by another
scan of the same name (headers, tile tables and the last tiles differ).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from histofm.errors import HistofmError

_MIB = 1 << 20

# Keys a rerun compares before it skips a slide (all of them: a file is reused only when identical).
PROVENANCE_KEYS = (
    "model_name", "weights_source", "weights_file", "weights_sha256", "weights_repo", "weights_revision",
    "preprocess_resize", "preprocess_interpolation", "preprocess_mean", "preprocess_std", "preprocess_stain_norm",
    "mpp", "tile_size", "overlap", "min_tissue", "level", "read_size", "tiles_from", "roi",
    "slide", "slide_bytes", "level0_mpp", "slide_fingerprint", "histofm_version", "layout",
)
# Read back as well (not compared: they follow from the others).
_EXTRA_KEYS = ("embed_dim",)


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """Hex ``sha256(size + first MiB + last MiB)`` of a file (see the module docstring)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            digest.update(f.read(_MIB))
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """HDF5 attribute value -> JSON-friendly Python (str, int, float; arrays as lists)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attributes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every attribute of a feature file, as JSON-friendly Python values (arrays as lists).

    The one reader of feature-file attributes: histofm files keep them on the file,
    CLAM and TRIDENT on the ``coords`` dataset; both are read, and where a key is in
    both the file's own value wins.

    Raises:
        HistofmError: the file is missing or not HDF5.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise HistofmError(f"Feature file not found: {path}; run `histofm extract` first.")
    try:
        with h5py.File(path, "r") as f:
            coords = f["coords"].attrs.items() if "coords" in f else ()
            attrs = {**dict(coords), **dict(f.attrs.items())}
    except OSError as e:
        raise HistofmError(
            f"Cannot read {path.name} as HDF5 ({e}); the file may be truncated or not a feature file, extract it again."
        ) from None
    return {k: _plain(v) for k, v in attrs.items()}


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance of a feature file as a dict with the keys of the module table.

    Keys a file does not hold (files from older histofm versions, CLAM, TRIDENT) are
    ``None``; a file without any weights record reads ``weights_source = "unrecorded"``.
    Values are those of :func:`read_attributes` (mean and std as lists).

    Raises:
        HistofmError: the file is missing or not HDF5.
    """
    attrs = read_attributes(path)
    out = {key: attrs.get(key) for key in (*PROVENANCE_KEYS, *_EXTRA_KEYS)}
    if out["weights_source"] is None:
        out["weights_source"] = "unrecorded"
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if not isinstance(a, (tuple, list)) or not isinstance(b, (tuple, list)) or len(a) != len(b):
            return False
        return all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def _show(key: str, value: Any) -> str:
    if value is None or value == "":
        return "none"
    if key.endswith(("sha256", "fingerprint", "revision")) and isinstance(value, str) and len(value) > 12:
        return value[:12]
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def differences(have: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``"key: <in the file> in the file, <wanted> now"`` for each provenance key that differs."""
    return [
        f"{key} {_show(key, have.get(key))} in the file, {_show(key, wanted.get(key))} now"
        for key in PROVENANCE_KEYS
        if key in wanted and not _same(have.get(key), wanted.get(key))
    ]
