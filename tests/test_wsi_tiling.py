"""Tissue detection and tiling on the bundled real slide, checked against a hand-made map."""

from __future__ import annotations

import csv
import json
import math

import h5py
import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image

from histofm import HistofmError
from histofm.data import sample_path
from histofm.wsi import (
    detect_tissue,
    grid_coords,
    open_slide,
    otsu_threshold,
    read_coords,
    save_coords,
    tile_slide,
    tile_spec,
)

SVS = sample_path("cmu_small_region")
W, H = 2220, 2967

# Hand-made map, drawn by looking at the thumbnail cut into 6 columns x 8 rows of
# 370 x 371 level-0 pixels: T = mostly tissue, B = glass (at most a speck),
# ? = mixed (not checked). Row 0 is the top of the slide.
HAND_MAP = [
    "BB???B",
    "BB???B",
    "???T?B",  # a thin strip of tissue crosses rows 2-3 from the left
    "???T??",
    "BB???B",
    "BBTT??",
    "B?TTT?",
    "B?TTTB",
]


@pytest.fixture(scope="module")
def slide():
    with open_slide(SVS) as s:
        yield s


@pytest.fixture(scope="module")
def tissue(slide):
    return detect_tissue(slide)


def test_tissue_where_the_hand_map_says(tissue):
    cw, ch = W / 6, H / 8
    checked = 0
    for row, line in enumerate(HAND_MAP):
        for col, label in enumerate(line):
            if label == "?":
                continue
            # Mean of the mask over the cell (the cell is not square: average two boxes).
            frac = tissue.tile_fractions(np.array([[col * cw, row * ch], [col * cw, row * ch + ch - cw]]), cw).mean()
            if label == "T":
                assert frac > 0.6, (row, col, frac)
            else:
                assert frac < 0.05, (row, col, frac)
            checked += 1
    assert checked >= 25
    # The thin strip of dermis reaching left (level-0 x 60-850, y 1000-1150) is tissue too.
    strip = tissue.tile_fractions(np.array([[300.0, 1100.0], [510.0, 1050.0]]), 25.0)
    assert (strip > 0.5).all(), strip
    assert 0.2 < tissue.fraction < 0.5  # by eye about a third of the slide


def test_otsu_matches_brute_force():
    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(0.1, 0.03, 3000), rng.normal(0.5, 0.1, 1000)]), 0, 1)
    t = otsu_threshold(values)
    # Brute force: the cut minimising within-class variance, at the same bin edges.
    best, best_t = np.inf, None
    for cut in np.linspace(0, 1, 257)[1:-1]:
        lo, hi = values[values < cut], values[values >= cut]
        if len(lo) == 0 or len(hi) == 0:
            continue
        within = len(lo) * lo.var() + len(hi) * hi.var()
        if within < best:
            best, best_t = within, cut
    assert abs(t - best_t) <= 1 / 256 + 1e-9


def test_tiles_deterministic_stable_and_on_tissue(slide, tissue):
    a = tile_slide(slide, 0.5, 224, tissue=tissue)
    b = tile_slide(slide, 0.5, 224)  # tissue detected afresh
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape[1] == 2
    # By eye about 1/3 of the 9 x 13 grid of 224 px tiles is tissue.
    assert 30 <= len(a) <= 60
    # Same tiles through the other backend (its own JPEG decoder).
    with open_slide(SVS, backend="tiffslide") as other:
        np.testing.assert_array_equal(tile_slide(other, 0.5, 224), a)
    # Row-major order, within the slide.
    order = np.lexsort((a[:, 0], a[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(a)))
    size0 = 224 * 0.5 / 0.499
    assert (a >= 0).all() and (a[:, 0] + size0 <= W + 1).all() and (a[:, 1] + size0 <= H + 1).all()
    # Kept tiles hold stained pixels (a check that does not use the mask): saturated fraction.
    for x, y in a[:: max(1, len(a) // 8)]:
        px = np.asarray(slide.read_region_mpp(int(x), int(y), 224, 0.5), dtype=np.float32)
        sat = (px.max(2) - px.min(2)) / np.maximum(px.max(2), 1)
        assert (sat > 0.15).mean() > 0.2


def test_full_grid_and_overlap(slide, tissue):
    size0 = 224 * 0.5 / 0.499
    every = tile_slide(slide, 0.5, 224, min_tissue=0.0)
    nx, ny = math.floor((W - size0) / size0) + 1, math.floor((H - size0) / size0) + 1
    assert len(every) == nx * ny == 9 * 13
    spec = tile_spec(slide, 0.5, 224, overlap=112)
    assert spec.stride_level0 == pytest.approx(112 * 0.5 / 0.499)
    half = grid_coords(slide.dimensions, spec.size_level0, spec.stride_level0)
    steps = np.unique(np.diff(np.unique(half[:, 0])))
    assert set(steps.tolist()) <= {112, 113}
    more = tile_slide(slide, 0.5, 224, overlap=112, tissue=tissue)
    assert len(more) > 3 * len(tile_slide(slide, 0.5, 224, tissue=tissue))


def test_mask_png_and_geojson_agree_with_mask(tissue, tmp_path):
    png = tissue.save_png(tmp_path / "mask.png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)) > 0, tissue.mask)
    gj = json.loads(tissue.save_geojson(tmp_path / "t.geojson", name="cmu").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) >= 1
    # Oracle: matplotlib's point-in-polygon on the rings, at the centre of every mask pixel.
    h, w = tissue.mask.shape
    sx, sy = tissue.downsample
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.stack([(xx.ravel() + 0.5) * sx, (yy.ravel() + 0.5) * sy], 1)
    inside = np.zeros(len(pts), bool)
    for feat in gj["features"]:
        rings = feat["geometry"]["coordinates"]
        assert all(r[0] == r[-1] for r in rings)
        areas = [0.5 * float(np.dot(a[:-1, 0], a[1:, 1]) - np.dot(a[1:, 0], a[:-1, 1])) for a in map(np.array, rings)]
        assert areas[0] > 0 and all(a < 0 for a in areas[1:])  # outer ring first, holes opposite
        inner = MplPath(np.array(rings[0])).contains_points(pts)
        for hole in rings[1:]:
            inner &= ~MplPath(np.array(hole)).contains_points(pts)
        inside |= inner
    agree = (inside == tissue.mask.ravel()).mean()
    assert agree > 0.97
    area = sum(f["properties"]["area_px"] for f in gj["features"])
    assert area == pytest.approx(tissue.mask.sum() * sx * sy, rel=0.05)


def test_coords_files_round_trip(slide, tissue, tmp_path):
    coords = tile_slide(slide, 0.5, 224, tissue=tissue)
    spec = tile_spec(slide, 0.5, 224)
    h5 = save_coords(tmp_path / "c.h5", coords, spec, name="cmu")
    with h5py.File(h5, "r") as f:  # the way CLAM / TRIDENT read it
        np.testing.assert_array_equal(f["coords"][:], coords)
        assert f["coords"].attrs["patch_size"] == 224 and f["coords"].attrs["level"] == 0
        assert f["coords"].attrs["patch_size_level0"] == 224
        assert f["coords"].attrs["target_magnification"] == pytest.approx(20.0)
    back, attrs = read_coords(h5)
    np.testing.assert_array_equal(back, coords)
    csv_path = save_coords(tmp_path / "c.csv", coords, spec)
    with open(csv_path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["x", "y"] and [list(map(int, r)) for r in rows[1:]] == coords.tolist()
    with pytest.raises(HistofmError, match=".h5 or .csv"):
        save_coords(tmp_path / "c.txt", coords, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.h5"]  # no temporary left


def test_blank_and_tiny_slides_fail_clearly(tmp_path):
    rng = np.random.default_rng(0)
    blank = np.clip(245 + rng.normal(0, 2, (800, 800, 3)), 0, 255).astype(np.uint8)  # glass with noise
    Image.fromarray(blank).save(tmp_path / "blank.png")
    with open_slide(tmp_path / "blank.png", mpp=0.5) as s:
        with pytest.raises(HistofmError, match="No tissue found") as info:
            tile_slide(s)
    assert "\n" not in str(info.value)
    with open_slide(SVS) as s:
        Image.fromarray(np.asarray(s.read_region((1000, 1500), 0, (100, 100)))).save(tmp_path / "tiny.png")
    with open_slide(tmp_path / "tiny.png", mpp=0.5) as s:
        with pytest.raises(HistofmError, match="smaller than one 224 px tile"):
            tile_slide(s)
    with open_slide(SVS) as s:
        with pytest.raises(HistofmError, match="overlap"):
            tile_slide(s, overlap=224)
        with pytest.raises(HistofmError, match="between 0 and 1"):
            tile_slide(s, min_tissue=50)
