"""Weights you can trust: no random weights unless asked, --pretrained from an offline hub cache, provenance."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.errors import GatedRepoError
from PIL import Image
from safetensors.torch import save_file

import histofm
from histofm import HistofmError
from histofm.cli import main
from histofm.data import sample_path
from histofm.weights import load_encoder, resolve_weights
from histofm.wsi import open_slide
from histofm.wsi.features import ExtractConfig, extract_features, read_provenance
from histofm.wsi.provenance import PROVENANCE_KEYS

SVS = sample_path("cmu_small_region")
TINY = "vit_tiny_patch16_224"
ZOO = "kaiko_vits16"  # the smallest zoo entry published as one timm-format safetensors file
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> Path:
    """500 x 500 px of the real slide (0.499 um/px) as a PNG: four 224 px tiles, fast to embed."""
    path = tmp_path_factory.mktemp("region") / "region.png"
    with open_slide(SVS) as s:
        s.read_region((900, 1600), 0, (500, 500)).save(path)
    return path


def _tiny_checkpoint(path: Path, seed: int, **overrides) -> Path:
    torch.manual_seed(seed)
    save_file(histofm.create_model(TINY, **overrides).state_dict(), path)
    return path


def test_no_weights_is_refused_naming_the_three_ways_out(tmp_path, capfd, region) -> None:
    for call in (lambda: load_encoder(ZOO), lambda: load_encoder(TINY)):
        with pytest.raises(HistofmError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and all(f in msg for f in ("--checkpoint PATH", "--pretrained", "--random-init"))
    with pytest.raises(HistofmError, match="one source of weights, not --checkpoint and --random-init"):
        load_encoder(TINY, checkpoint=tmp_path / "x.pt", random_init=True)
    with pytest.raises(HistofmError, match="Checkpoint not found"):
        load_encoder(TINY, checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(HistofmError, match="no published weights to fetch with --pretrained"):
        resolve_weights(TINY, pretrained=True)
    with pytest.raises(HistofmError, match="never embeds with random ones"):
        extract_features([region], TINY, tmp_path / "f", progress=False)  # a bare name is not a choice
    out = tmp_path / "cli"
    assert main(["extract", str(region), "--model", TINY, "--out", str(out), "--mpp-override", "0.499"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--random-init" in err[0] and not out.exists()
    assert main(["cluster", str(region), "--model", TINY, "--out", str(out), "--mpp-override", "0.499"]) == 2
    err = capfd.readouterr().err
    assert "--checkpoint PATH" in err and "--random-init" in err and not out.exists()


def test_cluster_speaks_its_own_flags(tmp_path, capfd, region) -> None:
    from histofm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["cluster"]
    text = sub.format_help()
    assert "--mpp-override" in text and "--slide-mpp" not in text and "example:" in text
    # A PNG records no mpp: the message names --mpp-override, which cluster accepts (and the old alias still works).
    assert main(["cluster", str(region), "--model", TINY, "--random-init", "--out", str(tmp_path)]) == 2
    assert "--mpp-override" in capfd.readouterr().err
    # A QuPath region (the left half) restricts the tiles, as in tile and extract.
    roi = tmp_path / "left.geojson"
    left = [[0, 0], [250, 0], [250, 500], [0, 500], [0, 0]]
    roi.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [left]},
                                "properties": {"classification": {"name": "Tumor"}}}]))
    ok = main(["cluster", str(region), "--model", TINY, "--random-init", "--out", str(tmp_path), "--slide-mpp",
               "0.499", "--k", "2", "--tile-size", "112", "--min-tissue", "0.5", "--no-progress", "--device", "cpu",
               "--roi", str(roi), "--roi-as-tissue"])
    prov = read_provenance(tmp_path / "region.h5")
    assert ok == 0 and prov["weights_source"] == "random-init" and prov["roi"].startswith("tissue:left.geojson")
    with h5py.File(tmp_path / "region.h5") as f:
        xy = f["coords"][:]
    assert len(xy) >= 2 and (xy[:, 0] + 112 * 0.5 / 0.499 <= 250 + 112 * 0.5 / 0.499 / 2).all()  # half a tile in


def test_random_init_is_recorded_and_a_rerun_with_real_weights_is_not_skipped(tmp_path, region, capfd) -> None:
    """The issue's trap: features from random weights, then the right checkpoint into the same folder."""
    ckpt = _tiny_checkpoint(tmp_path / "tiny.safetensors", seed=1)
    out = tmp_path / "feats"
    base = ["extract", str(region), "--model", TINY, "--out", str(out), "--mpp-override", "0.499", "--workers", "0",
            "--no-progress", "--layout", "flat"]
    assert main([*base, "--random-init"]) == 0
    prov = read_provenance(out / "region.h5")
    assert prov["weights_source"] == "random-init" and prov["model_name"] == TINY
    capfd.readouterr()
    assert main([*base, "--checkpoint", str(ckpt)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights_source random-init in the file, checkpoint now" in err[0], err
    assert "--overwrite" in err[0] and "--out" in err[0]
    assert main([*base, "--checkpoint", str(ckpt), "--overwrite"]) == 0
    prov = read_provenance(out / "region.h5")
    assert prov["weights_source"] == "checkpoint" and prov["weights_file"] == "tiny.safetensors"
    assert prov["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert main([*base, "--checkpoint", str(ckpt)]) == 0 and "1 skipped" in capfd.readouterr().out
    other = _tiny_checkpoint(tmp_path / "other.safetensors", seed=2)
    assert main([*base, "--checkpoint", str(other)]) == 2
    assert "weights_file tiny.safetensors in the file, other.safetensors now" in capfd.readouterr().err


def _hub_cache(home: Path, repo: str, filename: str, tensors: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face cache as huggingface_hub lays it out: blobs, snapshots/<commit>/, refs/main."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file(tensors, snapshot / filename)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return snapshot / filename


def test_pretrained_comes_from_the_offline_hub_cache_and_is_recorded(tmp_path, region) -> None:
    info = histofm.model_info(ZOO)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in histofm.create_model(ZOO).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}  # official (timm) names
    weights = _hub_cache(tmp_path / "hf", info.hub_id, info.hub_filename, tensors)
    out = tmp_path / "feats"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-m", "histofm", "extract", str(region), "--model", ZOO, "--pretrained", "--out", str(out),
           "--mpp-override", "0.499", "--workers", "0", "--no-progress", "--min-tissue", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    path = out / f"features_{ZOO}" / "region.h5"  # the default layout is TRIDENT's
    prov = read_provenance(path)
    assert prov["weights_source"] == "hub" and prov["weights_repo"] == info.hub_id
    assert prov["weights_revision"] == REVISION and prov["weights_file"] == "model.safetensors"
    assert prov["preprocess_mean"] == pytest.approx(info.mean) and prov["preprocess_std"] == pytest.approx(info.std)
    # The features are those of the cached weights (not random ones): recompute one tile.
    model = histofm.create_model(ZOO, checkpoint_path=weights).eval()
    with h5py.File(path) as f:
        feats, xy = f["features"][:], f["coords"][:]
    with open_slide(region, mpp=0.499) as s:
        tile = np.asarray(s.read_region_mpp(int(xy[0, 0]), int(xy[0, 1]), 224, 0.5), dtype=np.float32) / 255
    x = (torch.from_numpy(tile).permute(2, 0, 1) - 0.5) / 0.5
    with torch.no_grad():
        np.testing.assert_allclose(feats[0], model(x[None])[0].numpy(), atol=1e-4, rtol=1e-4)
    # Not in the cache and offline: one sentence that says how to proceed.
    env["HF_HOME"] = str(tmp_path / "empty")
    proc = subprocess.run([*cmd[:6], "uni", *cmd[7:]], capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "not in the local cache" in lines[0] and "--checkpoint PATH" in lines[0] and "huggingface-cli login" in lines[0]


def test_gated_repository_says_how_to_get_access(monkeypatch, tmp_path, region, capfd) -> None:
    err = GatedRepoError.__new__(GatedRepoError)  # its __init__ wants an HTTP response
    Exception.__init__(err, "401 Client Error: Cannot access gated repo")

    def refuse(*args, **kwargs):
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    assert main(["extract", str(region), "--model", "uni", "--pretrained", "--out", str(tmp_path / "o")]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "MahmoodLab/UNI is gated: accept its licence" in lines[0]
    assert "huggingface-cli login" in lines[0] and "HF_TOKEN" in lines[0]


def test_provenance_has_every_key_and_the_documented_fingerprint(tmp_path, region) -> None:
    ckpt = _tiny_checkpoint(tmp_path / "tiny.safetensors", seed=0, depth=1)
    model = load_encoder(TINY, checkpoint=ckpt, depth=1)
    report = extract_features([region], model, tmp_path, config=ExtractConfig(min_tissue=0.2), mpp=0.499,
                              progress=False)
    assert report.results[0].status == "done"
    prov = read_provenance(tmp_path / "region.h5")
    assert set(PROVENANCE_KEYS) <= prov.keys() and all(prov[k] is not None for k in PROVENANCE_KEYS)
    data = region.read_bytes()
    size = len(data)
    expected = hashlib.sha256(size.to_bytes(8, "little") + data[: 1 << 20] + data[max(1 << 20, size - (1 << 20)):])
    assert prov["slide_fingerprint"] == expected.hexdigest() and prov["slide_bytes"] == size
    assert prov["slide"] == "region.png" and prov["level0_mpp"] == pytest.approx(0.499)
    assert (prov["mpp"], prov["tile_size"], prov["overlap"], prov["min_tissue"]) == (0.5, 224, 0, 0.2)
    assert (prov["level"], prov["read_size"], prov["tiles_from"], prov["roi"]) == (0, 224, "tissue", "")
    assert prov["preprocess_resize"] == 224 and prov["preprocess_interpolation"] == "none"
    assert prov["histofm_version"] == histofm.__version__ and prov["embed_dim"] == 192
    # The same name with other content (a rescan): the fingerprint tells them apart, the rerun refuses.
    Image.open(region).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(region)
    again = extract_features([region], model, tmp_path, config=ExtractConfig(min_tissue=0.2), mpp=0.499,
                             progress=False).results[0]
    assert again.status == "failed" and "slide_fingerprint" in again.error


def test_tiles_unlike_the_models_recorded_preprocessing_warn_once(tmp_path, region) -> None:
    model = load_encoder(ZOO, random_init=True, depth=1)
    messages: list[str] = []
    slides = [region, tmp_path / "copy.png"]
    slides[1].write_bytes(region.read_bytes())
    cfg = ExtractConfig(tile_size=112, min_tissue=0)
    extract_features(slides, model, tmp_path / "o", config=cfg, mpp=0.499, progress=False, warn=messages.append)
    assert len(messages) == 1 and "224 px tiles at 0.5 um/px" in messages[0] and "112 px tiles" in messages[0]
    messages.clear()
    extract_features([region], model, tmp_path / "p", config=ExtractConfig(min_tissue=0), mpp=0.499, progress=False,
                     warn=messages.append)
    assert messages == []


def test_random_init_is_seeded_recorded_and_leaves_the_global_rng_alone() -> None:
    """Two ``--random-init`` encoders of the same settings are the same encoder, and the record says which."""
    from histofm.weights import RANDOM_INIT, load_encoder, state_sha256

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_encoder("vit_tiny_patch16_224", random_init=True, depth=1, img_size=32)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random state is untouched
    b = load_encoder("vit_tiny_patch16_224", random_init=True, depth=1, img_size=32)
    c = load_encoder("vit_tiny_patch16_224", random_init=True, depth=2, img_size=32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ra, rb, rc = a.histofm_weights, b.histofm_weights, c.histofm_weights
    assert ra.source == RANDOM_INIT and ra == rb and ra.sha256 == state_sha256(a)
    assert rc.sha256 != ra.sha256  # another architecture: another record, so its features cannot be mixed in


def test_extract_set_rebuilds_a_backbone_pretrained_with_other_settings(tmp_path, region, capfd) -> None:
    """A checkpoint of a 1-block encoder: refused without --set (one sentence), extracted with --set depth=1."""
    ckpt = _tiny_checkpoint(tmp_path / "depth1.safetensors", seed=0, depth=1)
    out = tmp_path / "feats"
    base = ["extract", str(region), "--model", TINY, "--out", str(out), "--mpp-override", "0.499", "--workers", "0",
            "--no-progress", "--layout", "flat", "--checkpoint", str(ckpt)]
    assert main(base) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not out.joinpath("region.h5").exists(), err
    assert main([*base, "--set", "depth=abc"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set depth=abc" in err[0], err
    assert main([*base, "--set", "depth=1"]) == 0
    with h5py.File(out / "region.h5") as f:
        feats = f["features"][:]
    expected = load_encoder(TINY, checkpoint=ckpt, depth=1).eval()
    # the tile count is not this test's business (the provenance test flips the shared region: 4 tiles, then 3)
    assert feats.ndim == 2 and feats.shape[0] >= 1 and feats.shape[1] == expected.num_features
    assert np.isfinite(feats).all()
