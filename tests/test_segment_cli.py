"""``histofm segment``: chunked stitching against known nuclei, output files, QuPath GeoJSON, bad input."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from shapely.geometry import Point, shape

import histofm.cells.infer as infer
from histofm.cells.hovernet import HoVerNetConfig, build_hovernet, hv_targets
from histofm.cells.metrics import seg_stats
from histofm.cells.train import load_hgsc, save_cell_model
from histofm.cli import main

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 64}
NEOPLASTIC, INFLAMMATORY = (60, 30, 160), (60, 30, 50)


def _synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 200 x 280 pink field with ~40 separate discs (purple: type 3, dark red: type 2), many on 64 px chunk borders."""
    rng = np.random.default_rng(seed)
    H, W = 200, 280
    yy, xx = np.mgrid[:H, :W]
    inst = np.zeros((H, W), np.int32)
    types = np.zeros((H, W), np.int64)
    centres: list[tuple[int, int]] = []
    k = 0
    for _ in range(400):
        cy, cx = rng.integers(4, H - 4), rng.integers(4, W - 4)
        if rng.random() < 0.5:  # half of them sit on a chunk border
            cx = 64 * rng.integers(1, W // 64 + 1) + rng.integers(-2, 3)
        if any((cy - y) ** 2 + (cx - x) ** 2 < 18**2 for y, x in centres) or cx >= W - 4:
            continue
        k += 1
        centres.append((cy, cx))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(4, 8) ** 2
        inst[disc] = k
        types[disc] = 3 if k % 2 else 2
    img = np.empty((H, W, 3), np.uint8)
    img[:] = (235, 200, 220)
    img[types == 3] = NEOPLASTIC
    img[types == 2] = INFLAMMATORY
    return img, inst, types


def _oracle_maps(model, rgb: np.ndarray, *args, **kwargs) -> dict[str, np.ndarray]:
    """Exact maps read off the synthetic colours: what a perfect network would output."""
    dark = rgb[..., 0] < 128
    inst = ndimage.label(dark)[0]
    tp = np.zeros((4,) + dark.shape, np.float32)
    tp[0] = ~dark
    tp[3] = dark & (rgb[..., 2] > 100)
    tp[2] = dark & (rgb[..., 2] <= 100)
    return {"np": dark.astype(np.float32), "hv": hv_targets(inst), "tp": tp}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = HoVerNetConfig(encoder_kwargs=TINY, widths=(8, 16, 32), tile=64)
    return save_cell_model(build_hovernet(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "cells.safetensors")


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_chunked_segmentation_of_a_slide_finds_every_nucleus_once(tmp_path, checkpoint, monkeypatch) -> None:
    img, inst, types = _synthetic()
    slide = tmp_path / "synthetic.tif"  # a tiled TIFF with its resolution: read as a slide
    tifffile.imwrite(slide, img, photometric="rgb", tile=(64, 64), resolution=(1e4 / 0.25, 1e4 / 0.25),
                     resolutionunit="CENTIMETER")
    monkeypatch.setattr(infer, "predict_maps", _oracle_maps)
    rc = main(["segment", "--model", "vit_tiny_patch8_224", "--checkpoint", str(checkpoint), str(slide),
               "--out", str(tmp_path / "out"), "--chunk", "64", "--margin", "16", "--no-progress",
               "--set", "min_size=5"])
    assert rc == 0
    out = tmp_path / "out" / "synthetic"
    mask = tifffile.imread(out / "mask.tiff")
    assert mask.shape == inst.shape
    m = seg_stats(inst, mask).metrics()
    assert mask.max() == inst.max() and m["pq"] == pytest.approx(1.0) and m["aji"] == pytest.approx(1.0)
    rows = _read_csv(out / "nuclei.csv")
    assert len(rows) == inst.max()
    gt_cen = np.array(ndimage.center_of_mass(np.ones_like(inst), inst, np.arange(1, inst.max() + 1)))[:, ::-1]
    for row in rows:
        i = int(row["id"])
        assert mask[round(float(row["centroid_y"])), round(float(row["centroid_x"]))] == i
        gt_id = int(np.argmin(np.hypot(*(gt_cen - [float(row["centroid_x"]), float(row["centroid_y"])]).T)))
        assert int(row["area_px"]) == (inst == gt_id + 1).sum()
        assert row["type"] == ("neoplastic" if types[inst == gt_id + 1][0] == 3 else "inflammatory")
    gj = json.loads((out / "nuclei.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(rows)
    for feat, row in zip(gj["features"], rows):
        props = feat["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == row["type"]
        assert len(props["classification"]["color"]) == 3
        poly = shape(feat["geometry"])
        assert poly.is_valid and poly.exterior.is_ccw
        assert poly.contains(Point(float(row["centroid_x"]), float(row["centroid_y"])))  # level-0 pixels
        assert abs(poly.area - int(row["area_px"])) < 0.2 * int(row["area_px"]) + 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mpp"] == pytest.approx(0.25) and summary["nuclei"] == len(rows)
    assert (out / "overlay.png").stat().st_size > 0
    for f in out.iterdir():
        assert oct(os.stat(f).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_trained_checkpoint_on_a_real_image(tmp_path, checkpoint) -> None:
    image, _, _ = load_hgsc()
    png = tmp_path / "field.png"
    Image.fromarray(image[:150, :170]).save(png)
    rc = main(["segment", "--model", "vit_tiny_patch8_224", "--checkpoint", str(checkpoint), str(png),
               "--out", str(tmp_path / "out"), "--mask-format", "npz", "--mpp-override", "0.5", "--no-progress",
               "--set", "threshold=0.45"])
    assert rc == 0
    out = tmp_path / "out" / "field"
    mask = np.load(out / "mask.npz")["mask"]
    assert mask.shape == (150, 170)
    rows = _read_csv(out / "nuclei.csv")
    ids = np.unique(mask)
    ids = ids[ids > 0]  # instance ids are 1..N without gaps, whether or not background remains
    assert len(rows) == mask.max() == len(ids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mpp"] == 0.5 and summary["postprocess"]["threshold"] == 0.45


def test_random_init_png_mask(tmp_path, monkeypatch) -> None:
    img, inst, _ = _synthetic(1)
    png = tmp_path / "s.png"
    Image.fromarray(img).save(png)
    monkeypatch.setattr(infer, "predict_maps", _oracle_maps)
    rc = main(["segment", "--model", "vit_tiny_patch8_224", "--random-init", "--set", "backbone.depth=3",
               "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2", str(png), "--out", str(tmp_path),
               "--mask-format", "png", "--no-progress", "--set", "min_size=5"])
    assert rc == 0
    mask = np.asarray(Image.open(tmp_path / "s" / "mask.png"))
    assert seg_stats(inst, mask).metrics()["pq"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "vit_small_patch16_224"], "trained on 'vit_tiny_patch8_224'"),
        (["--model", "nope"], "Unknown --model"),
        (["--model", "vit_tiny_patch8_224", "--set", "colour=1"], "Unknown --set key"),
        (["--model", "vit_tiny_patch8_224", "--set", "backbone.depth=2"], "use it with --random-init"),
        (["--model", "vit_tiny_patch8_224", "--set", "threshold"], "KEY=VALUE"),
        (["--model", "vit_tiny_patch8_224", "--tile", "60"], "multiple of the patch size"),
    ],
)
def test_bad_input_gives_one_sentence(tmp_path, checkpoint, capsys, extra, message) -> None:
    png = tmp_path / "x.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    rc = main(["segment", *extra, "--checkpoint", str(checkpoint), str(png), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_input_and_checkpoint(tmp_path, checkpoint, capsys) -> None:
    rc = main(["segment", "--model", "vit_tiny_patch8_224", "--checkpoint", str(checkpoint), str(tmp_path / "none.png"),
               "--out", str(tmp_path)])
    assert rc == 2 and "Input not found" in capsys.readouterr().err
    png = tmp_path / "x.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    rc = main(["segment", "--model", "vit_tiny_patch8_224", "--checkpoint", str(tmp_path / "no.safetensors"), str(png),
               "--out", str(tmp_path)])
    assert rc == 2 and "--checkpoint" in capsys.readouterr().err
