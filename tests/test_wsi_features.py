"""Tile dataset, feature extraction to HDF5 and the `tile` / `extract` commands on the real slide."""

from __future__ import annotations

import dataclasses
import os
import pickle

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from torchvision import transforms as T

import histofm
from histofm import HistofmError
from histofm.cli import main
from histofm.data import sample_path
from histofm.registry import IMAGENET_MEAN, IMAGENET_STD
from histofm.wsi import open_slide, tile_slide
from histofm.wsi.dataset import SlideTileDataset
from histofm.wsi.features import (
    ExtractConfig,
    _eval_transform,
    _Preprocess,
    extract_features,
    read_features,
    shard_slides,
)

SVS = sample_path("cmu_small_region")
MODEL = "vit_tiny_patch16_224"


def _pid(_tile):
    return os.getpid()


@pytest.fixture(scope="module")
def coords():
    with open_slide(SVS) as s:
        return tile_slide(s, 0.5, 224)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return histofm.create_model(MODEL, depth=1).eval()


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Broken inputs, each a realistic mistake."""
    root = tmp_path_factory.mktemp("bad")
    data = SVS.read_bytes()
    (root / "notes.svs").write_text("patient notes, not a slide\n")
    (root / "truncated.svs").write_bytes(data[: len(data) // 2])
    with open_slide(SVS) as s:
        crop = np.asarray(s.read_region((900, 1400), 0, (400, 300)))
        s_region = s.read_region((900, 1600), 0, (700, 700))
        level0 = np.asarray(s.read_region((0, 0), 0, s.dimensions))
    Image.fromarray(crop).save(root / "crop.png")  # records no mpp
    region = np.asarray(s_region)
    Image.fromarray(region).save(root / "region.png")  # 700 x 700 px of tissue, for quick batch runs
    Image.fromarray(crop[:100, :100]).save(root / "tiny.png")
    Image.fromarray(np.full((600, 600, 3), 244, np.uint8)).save(root / "blank.png")
    # A pyramid whose thumbnail levels are fine but whose level-0 tiles are damaged: the
    # failure happens inside the DataLoader workers, not while finding tissue.
    pyr = root / "damaged.tif"
    with tifffile.TiffWriter(pyr) as tw:
        for i, k in enumerate((1, 2, 4)):
            img = level0 if k == 1 else np.asarray(Image.fromarray(level0).resize((2220 // k, 2967 // k)))
            tw.write(img, tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=int(i > 0),
                     resolution=(1e4 / (0.499 * k),) * 2, resolutionunit="CENTIMETER")
    with tifffile.TiffFile(pyr) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    raw = bytearray(pyr.read_bytes())
    for off, n in zip(offsets[20:], counts[20:]):
        raw[off : off + n] = bytes(n)
    pyr.write_bytes(bytes(raw))
    return root


def test_dataset_matches_direct_reads_and_workers_hold_their_own_handles(coords):
    parts = [coords[:6], coords[6:10]]
    ds = SlideTileDataset([SVS, SVS], parts)
    assert len(ds) == 10
    tile, xy, index = ds[7]
    assert tile.dtype == torch.uint8 and tile.shape == (3, 224, 224) and index == 1
    np.testing.assert_array_equal(xy.numpy(), coords[7])
    with open_slide(SVS) as s:
        ref = np.asarray(s.read_region_mpp(int(coords[7][0]), int(coords[7][1]), 224, 0.5))
    np.testing.assert_array_equal(tile.permute(1, 2, 0).numpy(), ref)

    serial = list(DataLoader(SlideTileDataset([SVS, SVS], parts), batch_size=4, num_workers=0))
    lazy = SlideTileDataset([SVS, SVS], parts)
    parallel = list(DataLoader(lazy, batch_size=4, num_workers=2))
    for a, b in zip(serial, parallel):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v)
    assert len(lazy._open) == 0  # the main process never opened a slide
    # Each worker process read tiles itself (one handle per worker, none shared).
    pids = torch.cat(list(DataLoader(SlideTileDataset([SVS], [coords[:8]], transform=_pid, return_meta=False),
                                     batch_size=2, num_workers=2)))
    assert len(set(pids.tolist())) == 2 and os.getpid() not in pids.tolist()
    # Handles never travel with the dataset (spawn workers).
    assert pickle.loads(pickle.dumps(ds))._open == {}


def test_dataset_for_pretraining_returns_the_transform_output(coords):
    aug = T.Compose([T.RandomResizedCrop(96), T.ToTensor()])
    ds = SlideTileDataset([SVS], [coords], transform=lambda im: (aug(im), aug(im)), return_meta=False)
    v1, v2 = next(iter(DataLoader(ds, batch_size=5, shuffle=True)))
    assert v1.shape == v2.shape == (5, 3, 96, 96) and not torch.equal(v1, v2)


def test_fast_path_equals_the_models_own_transform(coords):
    pre = _Preprocess(MODEL, 224, None)
    assert pre.tile_transform is None  # 224 px tiles for a 224 px model: batched normalisation
    ds = SlideTileDataset([SVS], [coords[:4]])
    batch, xy = pre.collate([ds[i] for i in range(4)])
    np.testing.assert_array_equal(xy.numpy(), coords[:4])
    fast = pre.batch(batch, torch.device("cpu"))
    own = _eval_transform(MODEL, histofm.model_info(MODEL))
    slow = torch.stack([own(ds.read_tile(i)) for i in range(4)])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_extract_writes_a_clam_trident_file(tmp_path, model, coords):
    report = extract_features([SVS], model, tmp_path, config=ExtractConfig(batch_size=16), progress=False)
    assert [r.status for r in report.results] == ["done"] and report.tiles == len(coords)
    with h5py.File(tmp_path / "cmu_small_region.h5", "r") as f:  # plain h5py, as CLAM / TRIDENT read it
        feats, xy = f["features"][:], f["coords"][:]
        assert feats.dtype == np.float32 and feats.shape == (len(coords), 192)
        np.testing.assert_array_equal(xy, coords)
        assert f["coords"].attrs["patch_size"] == 224 and f["coords"].attrs["patch_size_level0"] == 224
        assert "patch_level" not in f["coords"].attrs  # flat layout: TRIDENT's meaning only
        assert f.attrs["model_name"] == MODEL and f.attrs["embed_dim"] == 192
        assert f.attrs["mpp"] == 0.5 and f.attrs["tile_size"] == 224 and f.attrs["level"] == 0
        assert f.attrs["histofm_version"] == histofm.__version__
    # Recompute three rows by hand: read the tile, normalise with ImageNet statistics, embed.
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    with open_slide(SVS) as s, torch.no_grad():
        for i in (0, len(coords) // 2, len(coords) - 1):
            x, y = (int(v) for v in coords[i])
            tile = torch.from_numpy(np.array(s.read_region_mpp(x, y, 224, 0.5))).permute(2, 0, 1).float() / 255
            np.testing.assert_allclose(feats[i], model(norm(tile)[None])[0].numpy(), atol=1e-4, rtol=1e-4)
    f2, c2, attrs = read_features(tmp_path / "cmu_small_region.h5")
    np.testing.assert_array_equal(f2, feats)
    assert attrs["level"] == 0 and attrs["model_name"] == MODEL and attrs["weights_source"] == "unrecorded"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmu_small_region.h5"]


def test_resume_skips_done_slides_and_protects_other_settings(tmp_path, model, bad):
    cfg = ExtractConfig(batch_size=64)
    slide = bad / "region.png"  # a 700 px crop of the real slide, read at its true 0.499 um/px

    def run(config):
        return extract_features([slide], model, tmp_path, config=config, mpp=0.499, progress=False).results[0]

    out = tmp_path / "region.h5"
    first = run(cfg)
    assert first.status == "done" and first.tiles > 0
    # Which file and when: a rewrite is a new file renamed into place (another inode), even when it lands
    # within the same tick of the file system's coarse clock as the first write (then the mtimes are equal).
    def stamp_of() -> tuple[int, int]:
        return out.stat().st_ino, out.stat().st_mtime_ns

    stamp = stamp_of()
    assert run(cfg).status == "skipped" and stamp_of() == stamp
    other = run(dataclasses.replace(cfg, tile_size=256))
    assert other.status == "failed" and "other settings" in other.error
    assert stamp_of() == stamp
    redo = run(dataclasses.replace(cfg, overwrite=True))
    assert redo.status == "done" and stamp_of() != stamp


def test_one_bad_slide_does_not_stop_the_batch(tmp_path, model, bad):
    slides = [bad / "notes.svs", bad / "region.png", bad / "damaged.tif"]
    cfg = ExtractConfig(num_workers=2, batch_size=8)
    report = extract_features(slides, model, tmp_path, config=cfg, mpp=0.499, progress=False)
    assert [r.status for r in report.results] == ["failed", "done", "failed"]
    notes, damaged = report.failures
    assert "is not a slide or image" in notes.error
    assert "truncated or corrupt" in damaged.error  # raised inside a worker, reported as one sentence
    for failure in report.failures:
        assert "\n" not in failure.error and "Traceback" not in failure.error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["region.h5"]  # nothing half-written


def test_shard_slides_by_rank():
    slides = [f"s{i}.svs" for i in range(7)]
    shards = [shard_slides(slides, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(slides)
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    with pytest.raises(HistofmError, match="not valid"):
        shard_slides(slides, 3, 3)


@pytest.mark.parametrize(
    "name,extra,expected",
    [
        ("missing.svs", [], "not found"),
        ("notes.svs", [], "is not a slide or image"),
        ("truncated.svs", [], "truncated or corrupt"),
        ("crop.png", [], "--mpp-override"),
        ("tiny.png", ["--mpp-override", "0.5"], "smaller than one 224 px tile"),
        ("blank.png", ["--mpp-override", "0.5"], "No tissue found"),
    ],
)
def test_tile_command_bad_input(bad, tmp_path, capfd, name, extra, expected):
    out = tmp_path / "out"
    rc = main(["tile", str(bad / name), "--out", str(out), *extra])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("histofm: error:") and expected in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_tile_command_writes_coords_and_pictures(tmp_path, capfd, coords, bad):
    out = tmp_path / "tiles"
    # A bad slide in the batch is reported in one line; the good one is done all the same.
    assert main(["tile", str(bad / "notes.svs"), str(SVS), "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.svs" in err[0]
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"cmu_small_region{s}" for s in (".h5", "_tiles.png", "_tissue.geojson", "_tissue.png")]
    with h5py.File(out / "cmu_small_region.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], coords)
    picture = Image.open(out / "cmu_small_region_tiles.png")
    assert max(picture.size) <= 1024 and picture.mode == "RGB"
    csv_out = tmp_path / "csv"
    assert main(["tile", str(bad / "region.png"), "--mpp-override", "0.499", "--format", "csv", "--out", str(csv_out)]) == 0
    assert capfd.readouterr().err == ""
    rows = (csv_out / "region.csv").read_text().splitlines()
    assert rows[0] == "x,y" and len(rows) > 1


def test_extract_command_batch_with_a_bad_slide(tmp_path, capfd, bad):
    # Random weights without the cost of timm-style initialisation: shapes from a meta-device model.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in histofm.create_model(MODEL).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    weights = {k: (1.0 if k.endswith("norm.weight") or ".norm" in k and k.endswith("weight") else 0.0)
               + 0.05 * torch.randn(shape, generator=g) for k, shape in shapes.items()}
    ckpt = tmp_path / "w.safetensors"
    save_file(weights, ckpt)
    out = tmp_path / "feats"
    region = bad / "region.png"  # 700 px of the real slide: 300 px tiles make a 2 x 2 grid
    args = ["extract", "--model", MODEL, "--checkpoint", str(ckpt), str(region), str(bad / "notes.svs"),
            "--out", str(out), "--mpp-override", "0.499", "--tile-size", "300", "--min-tissue", "0.2",
            "--workers", "0", "--no-progress", "--layout", "flat"]
    assert main(args) == 2
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "notes.svs" in err[0] and "is not a slide or image" in err[0]
    assert "1 done" in captured.out and "1 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["region.h5"]
    feats, xy, attrs = read_features(out / "region.h5")
    assert attrs["tile_size"] == 300 and attrs["embed_dim"] == 192 and len(xy) >= 2
    net = histofm.create_model(MODEL, checkpoint_path=ckpt).eval()
    with open_slide(region, mpp=0.499) as s:
        np.testing.assert_array_equal(xy, tile_slide(s, 0.5, 300, min_tissue=0.2))
        # 300 px tiles for a 224 px model: the model's own eval transform resizes each tile.
        own = histofm.eval_transform(MODEL) if _has_zoo_transforms() else _eval_transform(MODEL, histofm.model_info(MODEL))
        tiles = torch.stack([own(s.read_region_mpp(int(x), int(y), 300, 0.5)) for x, y in xy])
    with torch.no_grad():
        np.testing.assert_allclose(feats, net(tiles).numpy(), atol=1e-4, rtol=1e-4)
    # Re-running skips the finished slide (and still reports the bad one).
    assert main(args) == 2
    assert "1 skipped" in capfd.readouterr().out


def _has_zoo_transforms() -> bool:
    try:
        import histofm.data.transforms  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def test_an_encoder_returning_a_view_of_its_input_keeps_every_batch(tmp_path, coords):
    """The CPU path reuses one float input buffer; features that alias it are copied before the next batch."""

    class FirstPixel(torch.nn.Module):  # returns a view of its input: the normalised top-left pixel
        def forward(self, x):
            return x[:, :, 0, 0]

    report = extract_features([SVS], FirstPixel(), tmp_path, config=ExtractConfig(batch_size=4, device="cpu"),
                              progress=False)
    assert report.tiles == len(coords) > 8
    feats, xy, _ = read_features(tmp_path / "cmu_small_region.h5")
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    with open_slide(SVS) as s:
        for i in range(len(coords)):
            x, y = (int(v) for v in xy[i])
            pixel = torch.from_numpy(np.array(s.read_region_mpp(x, y, 224, 0.5))[0, 0]).float() / 255
            np.testing.assert_allclose(feats[i], ((pixel - mean) / std).numpy(), atol=1e-5, err_msg=f"tile {i}")
