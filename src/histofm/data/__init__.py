"""Datasets, transforms and the bundled real sample images."""

from __future__ import annotations

from pathlib import Path

from histofm.errors import HistofmError

SAMPLES_DIR = Path(__file__).parent / "samples"

SAMPLES = {
    "cmu_small_region": "cmu_small_region.svs",
    "hgsc_nest": "hgsc_nest.jpg",
    "hgsc_nest_type_mask": "hgsc_nest_type_mask.npz",
    "hgsc_nest_inst_mask": "hgsc_nest_inst_mask.npz",
    "hgsc_stroma": "hgsc_stromal_he.jpg",
}


def sample_path(name: str) -> Path:
    """Path of a bundled sample by short name (see ``SAMPLES``) or file name."""
    file = SAMPLES.get(name, name)
    path = SAMPLES_DIR / file
    if not path.is_file():
        raise HistofmError(f"No bundled sample {name!r}; choose one of {', '.join(SAMPLES)}.")
    return path
