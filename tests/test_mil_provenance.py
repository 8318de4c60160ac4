"""Feature provenance: which attributes must agree across a run's features, and which may differ."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from histofm import HistofmError
from histofm.mil.provenance import check_against_run, common_provenance, compared_provenance

# Attributes as the extraction writes them (arrays for the normalisation constants).
BASE = {
    "model_name": "uni", "embed_dim": 4, "weights_source": "checkpoint", "weights_file": "uni.safetensors",
    "weights_sha256": "ab" * 32, "preprocess_resize": 224, "preprocess_interpolation": "bicubic",
    "preprocess_mean": np.array([0.485, 0.456, 0.406]), "preprocess_std": np.array([0.229, 0.224, 0.225]),
    "mpp": 0.5, "tile_size": 224, "overlap": 0, "min_tissue": 0.5, "level": 0, "read_size": 448,
    "level0_mpp": 0.25, "histofm_version": "0.1", "slide_fingerprint": "x",
}


def _write(path: Path, **changes: object) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 4), np.float32))
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
        f.attrs.update({**BASE, "slide": f"{path.stem}.svs", **changes})
    return path


def test_slide_specific_attributes_may_differ(tmp_path: Path) -> None:
    a = _write(tmp_path / "A.h5")
    b = _write(tmp_path / "B.h5", level=1, read_size=224, level0_mpp=0.5, slide_fingerprint="y", min_tissue=0.1,
               weights_file="copy_of_uni.safetensors", histofm_version="0.2")
    prov = common_provenance([a, b])
    assert prov["preprocess_mean"] == pytest.approx([0.485, 0.456, 0.406]) and "slide" not in prov
    assert "level0_mpp" not in prov and "weights_file" not in prov
    check_against_run(b, prov)  # no error


@pytest.mark.parametrize("key, value", [
    ("weights_sha256", "cd" * 32), ("weights_source", "random-init"), ("preprocess_mean", np.array([0.5, 0.5, 0.5])),
    ("preprocess_resize", 256), ("mpp", 1.0), ("tile_size", 256), ("model_name", "virchow2"),
])
def test_feature_space_attributes_must_agree(tmp_path: Path, key: str, value: object) -> None:
    a = _write(tmp_path / "A.h5")
    b = _write(tmp_path / "B.h5", **{key: value})
    with pytest.raises(HistofmError, match=f"mix {key} .*\\(A.h5\\).*\\(B.h5\\)"):
        common_provenance([a, b])
    with pytest.raises(HistofmError, match=f"{key}: run"):
        check_against_run(b, compared_provenance(a))


def test_a_renamed_file_is_refused(tmp_path: Path) -> None:
    c = _write(tmp_path / "C.h5", slide="D.svs")
    with pytest.raises(HistofmError, match="C.h5 says it holds slide 'D.svs'"):
        common_provenance([c])
