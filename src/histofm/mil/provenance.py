"""Feature provenance for slide-level runs: which encoder, weights, preprocessing and tiling made a bag.

Bags made by different encoders, weights, magnifications or tile sizes live in
different feature spaces; mixing them in one run (or scoring one model's input
with another's features) gives wrong science without an error. This module takes
the attributes a feature file carries (read by
:func:`histofm.wsi.provenance.read_attributes`) and compares them.

Keys compared (those both sides have; a key missing on one side is not a
difference, so CLAM / TRIDENT files with fewer attributes still load):

* encoder: ``model_name``, ``embed_dim``;
* weights: ``weights_source`` (checkpoint / hub / random-init), ``weights_sha256``, ``weights_repo``,
  ``weights_revision``, and the older ``weights`` / ``random_init`` where present (not
  ``weights_file``: the same weights under another file name are the same weights, and
  their SHA-256 says so);
* preprocessing: any attribute whose name starts with ``preprocess`` (``preprocess_resize``,
  ``preprocess_interpolation``, ``preprocess_mean``, ``preprocess_std``), and ``resize``,
  ``interpolation``, ``mean``, ``std`` where a file has them unprefixed;
* tiling: ``mpp`` (target microns per pixel), ``tile_size``, ``overlap``.

Per-slide attributes (``slide``, ``level0_mpp``, ``level`` and ``read_size``, which follow
from each slide's scan, sizes, fingerprints) and run details that do not change the feature
space (``min_tissue``, ``roi``, ``layout``, ``histofm_version``) are not compared; ``slide``,
when present, must name the same slide as the file name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from histofm.errors import HistofmError
from histofm.wsi.provenance import _same, read_attributes  # one reader, one tolerant comparison

COMPARED_KEYS = (
    "model_name", "embed_dim",
    "weights_source", "weights", "weights_sha256", "weights_repo", "weights_revision", "random_init",
    "resize", "interpolation", "mean", "std",
    "mpp", "tile_size", "overlap",
)
_PREFIXES = ("preprocess",)


def compared_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The compared attributes of a feature file, plus ``slide`` when it records one.

    A view of :func:`histofm.wsi.provenance.read_attributes` (the one reader: file
    attributes over ``coords`` attributes, JSON-friendly values).
    """
    attrs = read_attributes(path)
    out = {k: v for k, v in attrs.items() if k in COMPARED_KEYS or k.startswith(_PREFIXES)}
    if "slide" in attrs:
        out["slide"] = attrs["slide"]
    return out


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (a value, b value)}`` for compared keys present on both sides whose values differ."""
    keys = [k for k in a if k != "slide" and k in b and (k in COMPARED_KEYS or k.startswith(_PREFIXES))]
    return {k: (a[k], b[k]) for k in sorted(keys) if not _same(a[k], b[k])}


def check_slide_name(path: Path, prov: Mapping[str, Any]) -> None:
    """Refuse a file whose ``slide`` attribute names another slide than its file name."""
    slide = prov.get("slide")
    if slide is not None and Path(str(slide)).stem != path.stem:
        raise HistofmError(
            f"{path.name} says it holds slide {slide!r}, not {path.stem!r}; the file was renamed or copied "
            "over another slide's, so extract that slide again."
        )


def common_provenance(paths: Iterable[Path]) -> dict[str, Any]:
    """Check that feature files share one provenance and return it (without ``slide``).

    The first file that disagrees with the ones before it is named, with the key and both values.
    """
    common: dict[str, Any] = {}
    source: dict[str, Path] = {}  # the file each recorded value came from, to name both sides of a conflict
    for path in paths:
        prov = compared_provenance(path)
        check_slide_name(path, prov)
        diff = differences(common, prov)
        if diff:
            key, (a, b) = next(iter(diff.items()))
            raise HistofmError(
                f"Feature files mix {key} {a!r} ({source[key].name}) and {b!r} ({path.name}); "
                "put the features of one encoder, weights, mpp and tile size in one --features folder."
            )
        for k, v in prov.items():
            if k != "slide" and k not in common:
                common[k], source[k] = v, path
    return common


def check_against_run(path: Path, run_provenance: Mapping[str, Any], flag: str = "--features") -> None:
    """Refuse features whose provenance differs from the run's recorded one."""
    prov = compared_provenance(path)
    check_slide_name(path, prov)
    diff = differences(run_provenance, prov)
    if diff:
        desc = "; ".join(f"{k}: run {a!r}, file {b!r}" for k, (a, b) in diff.items())
        raise HistofmError(
            f"{path.name} was not made like the run's training features ({desc}); "
            f"extract this cohort with the run's encoder and settings and pass them as {flag}."
        )
