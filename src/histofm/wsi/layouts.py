"""Output layouts other tools read, and coordinates reused from other tools.

One ``patch_size`` cannot serve both CLAM and TRIDENT, because the two tools read it
differently (checked against their readers, see ``docs/wsi.md``):

* **TRIDENT** (``WSIPatcher``): ``patch_size`` is the side *at the target magnification*;
  ``patch_size_level0`` the side in level-0 pixels; a reader picks the level for the
  downsample ``level0_magnification / target_magnification``, reads
  ``round(patch_size_level0 / level_downsample)`` pixels there and resizes to
  ``patch_size`` (``level0_width`` / ``level0_height`` give the slide's size). Features go to
  ``<out>/features_<model>/<slide>.h5``.
* **CLAM** (``Whole_Slide_Bag_FP``): reads ``patch_size`` pixels *at* ``patch_level`` and
  hands them to the encoder's transform. So ``patch_size`` is the size histofm actually
  read (``read_size``) and ``patch_level`` the level it read; ``downsample`` is that level's
  ``(dx, dy)``. Features go to ``<out>/h5_files/<slide>.h5`` and ``<out>/pt_files/<slide>.pt``
  (a plain ``(N, D)`` float32 tensor that loads with ``torch.load(weights_only=True)``).
* **flat** (the Python API's default): ``<out>/<slide>.h5`` with TRIDENT's attributes.

:func:`reuse_coords` reads coordinates written by ``histofm tile`` (``<slide>.h5`` /
``<slide>.csv``), TRIDENT (``patches/<slide>_patches.h5``) or CLAM (``patches/<slide>.h5``)
and checks that their tiles have the size the extraction will read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from histofm.errors import HistofmError
from histofm.wsi.readers import SlideReader
from histofm.wsi.tiling import TileSpec, read_coords

LAYOUTS = ("trident", "clam", "flat")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise HistofmError(f"Unknown layout {layout!r}; choose --layout {', '.join(LAYOUTS)}.")
    return layout


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def feature_path(out_dir: str | os.PathLike[str], slide_name: str, model_name: str, layout: str) -> Path:
    """The HDF5 feature file of a slide in a layout."""
    out = Path(out_dir)
    if layout == "trident":
        return out / f"features_{_safe(model_name)}" / f"{slide_name}.h5"
    if layout == "clam":
        return out / "h5_files" / f"{slide_name}.h5"
    check_layout(layout)
    return out / f"{slide_name}.h5"


def pt_path(out_dir: str | os.PathLike[str], slide_name: str) -> Path:
    """CLAM's ``pt_files/<slide>.pt`` beside ``h5_files/``."""
    return Path(out_dir) / "pt_files" / f"{slide_name}.pt"


def coords_attrs(spec: TileSpec, layout: str, slide: SlideReader, name: str) -> dict[str, Any]:
    """The ``coords`` dataset's attributes in the layout's meaning (see the module docstring)."""
    if layout == "clam":
        ds = float(slide.level_downsamples[spec.level])
        dims = tuple(int(v) for v in slide.level_dimensions[spec.level])
        return {
            "patch_size": int(spec.read_size),  # pixels read at patch_level
            "patch_level": int(spec.level),
            "downsample": np.array([ds, ds], dtype=np.float64),
            "downsampled_level_dim": np.array(dims, dtype=np.int64),
            "level_dim": np.array(dims, dtype=np.int64),
            "name": name,
        }
    w0, h0 = slide.dimensions
    return {**trident_attrs(spec), "name": name, "level0_width": int(w0), "level0_height": int(h0)}


def trident_attrs(spec: TileSpec) -> dict[str, Any]:
    """TRIDENT's ``coords`` attributes: sizes at the target magnification and at level 0."""
    return {
        "patch_size": int(spec.tile_size),
        "patch_size_level0": int(round(spec.size_level0)),
        "level0_magnification": round(10.0 / spec.level0_mpp, 3),  # 0.25 um/px ~ 40x
        "target_magnification": round(10.0 / spec.target_mpp, 3),
        "overlap": int(spec.overlap),
    }


def _candidates(folder: Path, name: str) -> list[Path]:
    return [
        folder / f"{name}_patches.h5", folder / "patches" / f"{name}_patches.h5",  # TRIDENT
        folder / f"{name}.h5", folder / "patches" / f"{name}.h5",  # histofm tile, CLAM
        folder / f"{name}.csv",  # histofm tile --format csv
    ]


def find_coords_file(folder: str | os.PathLike[str], name: str) -> Path:
    """The coordinates file of slide ``name`` in ``folder`` (histofm, TRIDENT or CLAM naming)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HistofmError(f"Coordinates folder not found: {folder}; fix --coords.")
    for candidate in _candidates(folder, name):
        if candidate.is_file():
            return candidate
    raise HistofmError(
        f"No coordinates for {name} in {folder} (looked for {name}_patches.h5, {name}.h5 and {name}.csv, also "
        "under patches/); run `histofm tile` for it or drop --coords."
    )


def tile_size_level0(attrs: dict[str, Any], slide: SlideReader) -> float | None:
    """Side of the file's tiles in level-0 pixels, from TRIDENT's or CLAM's attributes (None if unknown)."""
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"])
    if "patch_size" in attrs and "patch_level" in attrs:
        level = int(attrs["patch_level"])
        if not 0 <= level < slide.level_count:
            raise HistofmError(f"The coordinates name patch_level {level}, but the slide has {slide.level_count} levels.")
        return float(attrs["patch_size"]) * float(slide.level_downsamples[level])
    return None


def coords_description(file: Path) -> str:
    """How a feature file records reused coordinates: ``coords:<file name>:sha256=<16 hex>``."""
    from histofm.weights import sha256_file

    return f"coords:{file.name}:sha256={sha256_file(file)[:16]}"


def reuse_coords(folder: str | os.PathLike[str], slide: SlideReader, spec: TileSpec) -> tuple[np.ndarray, str]:
    """``(coords (N, 2) int64, description)`` of a slide from a coordinates folder.

    Raises:
        HistofmError: no file for the slide, or its tiles are not the size this extraction reads.
    """
    name = slide.path.stem
    file = find_coords_file(folder, name)
    coords, attrs = read_coords(file)
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
    size0 = tile_size_level0(attrs, slide)
    if size0 is not None and abs(size0 - spec.size_level0) > max(1.5, 0.01 * spec.size_level0):
        raise HistofmError(
            f"The tiles in {file.name} are {size0:g} level-0 px wide but --tile-size {spec.tile_size} at --target-mpp "
            f"{spec.target_mpp:g} makes {spec.size_level0:.4g} px; set those two flags to match the coordinates."
        )
    w0, h0 = slide.dimensions
    if len(coords) == 0:
        raise HistofmError(f"{file.name} holds no coordinates; tile {name} again or drop --coords.")
    if (coords < 0).any() or coords[:, 0].max() >= w0 or coords[:, 1].max() >= h0:
        raise HistofmError(f"Coordinates in {file.name} lie outside {slide.path.name} ({w0} x {h0}); pass the folder of this slide.")
    return coords, coords_description(file)
