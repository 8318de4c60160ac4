"""``histofm extract`` reads a pretraining run's backbone.json and names the --model/--set that rebuild it."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest

import histofm
from histofm.cli import main
from histofm.data import sample_path
from histofm.train.checkpoint import export_backbone
from histofm.wsi import open_slide

TINY = "vit_tiny_patch16_224"


@pytest.fixture()
def region(tmp_path: Path) -> Path:
    """300 x 300 px of the bundled slide as a PNG: one 224 px tile."""
    path = tmp_path / "region.png"
    with open_slide(sample_path("cmu_small_region")) as s:
        s.read_region((900, 1600), 0, (300, 300)).save(path)
    return path


def test_extract_names_the_flags_a_pretrained_backbone_needs(tmp_path: Path, region: Path, capfd) -> None:
    run = tmp_path / "run"
    model = histofm.create_model(TINY, depth=1, drop_path_rate=0.1)
    weights = export_backbone(model, run)  # backbone.safetensors + backbone.json, as `histofm pretrain` writes
    out = tmp_path / "feats"
    base = ["extract", str(region), "--out", str(out), "--mpp-override", "0.499", "--workers", "0",
            "--no-progress", "--layout", "flat"]
    # It was "does not fit this model: missing N keys ..." with no hint of --set depth=1.
    for ckpt in (weights, run):  # the weights file, or the run's folder
        assert main([*base, "--model", TINY, "--checkpoint", str(ckpt)]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(f"pass --model {TINY} --set depth=1."), err
        assert "missing" not in err[0] and not out.exists(), err
    assert main([*base, "--model", "vit_small_patch16_224", "--set", "depth=1", "--checkpoint", str(weights)]) == 2
    err = capfd.readouterr().err
    assert f"written for {TINY} with --set depth=1" in err and err.count("\n") == 1, err
    # The flags it names work (dropout need not be repeated).
    assert main([*base, "--model", TINY, "--set", "depth=1", "--checkpoint", str(weights)]) == 0
    with h5py.File(out / "region.h5") as f:
        assert f["features"].shape == (1, model.num_features)
