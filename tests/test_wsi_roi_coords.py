"""QuPath GeoJSON regions, reused coordinates (histofm tile, TRIDENT, CLAM) and slide lists (folder, CSV)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from shapely.geometry import Polygon, box

from histofm import HistofmError
from histofm.cli import main
from histofm.data import sample_path
from histofm.wsi import open_slide, tile_slide, tile_spec
from histofm.wsi.features import ExtractConfig, extract_features, read_features, read_provenance
from histofm.wsi.roi import RoiFilter, read_annotations
from histofm.wsi.selection import select_tiles
from histofm.wsi.slides import resolve_slides

SVS = sample_path("cmu_small_region")
TUMOR = [[600, 1200], [1700, 1150], [1800, 2400], [700, 2500], [600, 1200]]  # level-0 pixels of the sample
HOLE = [[1000, 1600], [1300, 1600], [1300, 1900], [1000, 1900], [1000, 1600]]
PEN = [[[1400, 1300], [1900, 1300], [1900, 1800], [1400, 1800], [1400, 1300]]]


def _feature(coords, kind: str, name: str | None) -> dict:
    props = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


@pytest.fixture(scope="module")
def qupath(tmp_path_factory) -> Path:
    """A FeatureCollection as QuPath exports it: a tumour polygon with a hole, a pen MultiPolygon, a point."""
    path = tmp_path_factory.mktemp("roi") / "cmu_small_region.geojson"
    doc = {"type": "FeatureCollection", "features": [
        _feature([TUMOR, HOLE], "Polygon", "Tumor"),
        _feature([PEN], "MultiPolygon", "Pen"),
        _feature([100, 100], "Point", None),
    ]}
    path.write_text(json.dumps(doc))
    return path


class Mean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 3)
        return x.mean(dim=(2, 3))


def test_reads_qupath_collections_and_bare_lists(qupath, tmp_path) -> None:
    anns = read_annotations(qupath)
    assert [a.name for a in anns] == ["Tumor", "Pen"] and len(anns[0].polygons[0]) == 2  # outer ring + hole
    bare = tmp_path / "list.geojson"
    bare.write_text(json.dumps(json.loads(qupath.read_text())["features"]))  # older QuPath: a list of features
    assert [a.name for a in read_annotations(bare)] == ["Tumor", "Pen"]
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(HistofmError, match="not valid GeoJSON"):
        read_annotations(bad)
    with pytest.raises(HistofmError, match="no annotation of class 'Stroma'"):
        with open_slide(SVS) as s:
            select_tiles(s, tile_spec(s, 0.5, 224), roi=RoiFilter.create(qupath, "Stroma"))
    with pytest.raises(HistofmError, match="both in --roi-include and --roi-exclude"):
        RoiFilter.create(qupath, "Tumor", "Tumor")


@pytest.mark.parametrize("as_tissue", [False, True])
def test_tiles_lie_in_the_included_region_minus_the_excluded(qupath, as_tissue, tmp_path) -> None:
    region = Polygon(TUMOR, [HOLE]).difference(Polygon(PEN[0]))
    roi = RoiFilter.create(qupath, "Tumor", "Pen", as_tissue)
    with open_slide(SVS) as s:
        spec = tile_spec(s, 0.5, 112)
        chosen = select_tiles(s, spec, min_tissue=0.5, roi=roi)
        everything = tile_slide(s, 0.5, 112, min_tissue=0.5)
    assert 0 < len(chosen.coords) < len(everything) and "include=Tumor" in chosen.roi
    size = spec.size_level0
    for x, y in chosen.coords:  # the mask is a ~4 um/px raster: allow one mask pixel of slack per side
        tile = box(x, y, x + size, y + size)
        assert tile.intersection(region.buffer(12)).area >= 0.5 * tile.area - 1
    far_inside = [box(x, y, x + size, y + size) for x, y in tile_slide_grid(spec)
                  if box(x, y, x + size, y + size).buffer(16).within(region)]
    assert len(far_inside) >= 5
    kept = {tuple(c) for c in chosen.coords.tolist()}
    tissue_ok = {tuple(c) for c in everything.tolist()}
    for t in far_inside:  # every tile well inside the region is kept (when it is tissue, unless the region is it)
        corner = (round(t.bounds[0]), round(t.bounds[1]))
        if as_tissue or corner in tissue_ok:
            assert corner in kept, corner
    # The command line gives the same tiles.
    flags = ["--roi", str(qupath), "--roi-include", "Tumor", "--roi-exclude", "Pen"] + ["--roi-as-tissue"] * as_tissue
    assert main(["tile", str(SVS), "--out", str(tmp_path), "--tile-size", "112", *flags]) == 0
    np.testing.assert_array_equal(read_features_coords(tmp_path / "cmu_small_region.h5"), chosen.coords)


def tile_slide_grid(spec) -> np.ndarray:
    from histofm.wsi.tiling import grid_coords

    with open_slide(SVS) as s:
        return grid_coords(s.dimensions, spec.size_level0, spec.stride_level0)


def test_extract_reuses_coordinates_from_tile_trident_and_clam(tmp_path, capfd) -> None:
    tiles = tmp_path / "tiles"
    assert main(["tile", str(SVS), "--out", str(tiles), "--tile-size", "112", "--min-tissue", "0.8"]) == 0
    coords_tile = read_features_coords(tiles / "cmu_small_region.h5")
    cfg = ExtractConfig(tile_size=112, coords_dir=tiles, device="cpu", min_tissue=0.8)
    done = extract_features([SVS], Mean(), tmp_path / "a", config=cfg, progress=False)
    _, coords, _ = read_features(done.results[0].output)
    np.testing.assert_array_equal(coords, coords_tile)
    assert read_provenance(done.results[0].output)["tiles_from"].startswith("coords:cmu_small_region.h5:sha256=")
    # TRIDENT patches (patches/<slide>_patches.h5, sizes at target and level 0) and CLAM patches.
    some = coords_tile[::3]
    trident = tmp_path / "trident"
    (trident / "patches").mkdir(parents=True)
    with h5py.File(trident / "patches" / "cmu_small_region_patches.h5", "w") as f:
        d = f.create_dataset("coords", data=some)
        d.attrs.update({"patch_size": 112, "patch_size_level0": 112, "level0_magnification": 20.04,
                        "target_magnification": 20, "overlap": 0, "name": "cmu_small_region"})
    done = extract_features([SVS], Mean(), tmp_path / "b", config=ExtractConfig(tile_size=112, coords_dir=trident),
                            progress=False)
    np.testing.assert_array_equal(read_features(done.results[0].output)[1], some)
    clam = tmp_path / "clam"
    (clam / "patches").mkdir(parents=True)
    with h5py.File(clam / "patches" / "cmu_small_region.h5", "w") as f:
        d = f.create_dataset("coords", data=some)
        d.attrs.update({"patch_size": 256, "patch_level": 0, "downsample": [1.0, 1.0]})
    bad = extract_features([SVS], Mean(), tmp_path / "c", config=ExtractConfig(tile_size=112, coords_dir=clam),
                           progress=False)
    assert bad.results[0].status == "failed" and "256 level-0 px wide but --tile-size 112" in bad.results[0].error
    # The CLI: --coords with a folder that lacks the slide says so in one line.
    assert main(["extract", str(SVS), "--model", "vit_tiny_patch16_224", "--random-init", "--coords",
                 str(tmp_path / "nothing"), "--out", str(tmp_path / "d"), "--no-progress", "--workers", "0"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Coordinates folder not found" in err[0] and "--coords" in err[0]


def read_features_coords(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["coords"][:]


def test_slides_from_a_folder_and_a_csv_with_per_slide_mpp(tmp_path, capfd) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    with open_slide(SVS) as s:
        region = s.read_region((900, 1600), 0, (500, 500))
    region.save(folder / "a.png")  # a PNG records no mpp: the CSV gives it
    region.transpose(Image.Transpose.ROTATE_90).save(folder / "b.png")
    (folder / "notes.txt").write_text("not a slide")
    assert [s.path.name for s in resolve_slides([folder])] == ["a.png", "b.png"]
    csv_path = tmp_path / "cohort.csv"
    csv_path.write_text("slide_path,mpp\nslides/a.png,0.499\nslides/b.png,\n")
    out = tmp_path / "tiles"
    # b.png has an empty mpp cell and no metadata: it fails (named), a.png is tiled.
    assert main(["tile", str(csv_path), "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.png" in err[0] and "--mpp-override" in err[0]
    assert (out / "a.h5").is_file()
    # Without a header, and the global override for the rest.
    csv_path.write_text("slides/a.png,0.499\nslides/b.png\n")
    assert main(["tile", str(csv_path), "--out", str(out), "--mpp-override", "0.5"]) == 0
    with h5py.File(out / "a.h5") as f:
        assert f["coords"].attrs["level0_mpp"] == pytest.approx(0.499)
    with h5py.File(out / "b.h5") as f:
        assert f["coords"].attrs["level0_mpp"] == pytest.approx(0.5)
    # extract takes the same list: each slide's own mpp is used and recorded.
    done = extract_features(resolve_slides([csv_path]), Mean(), tmp_path / "f", mpp=0.5, progress=False,
                            config=ExtractConfig(device="cpu"))
    assert [r.status for r in done.results] == ["done", "done"]
    assert [read_provenance(r.output)["level0_mpp"] for r in done.results] == pytest.approx([0.499, 0.5])
    csv_path.write_text("slide_path,mpp\nslides/a.png,fast\n")
    assert main(["tile", str(csv_path), "--out", str(out)]) == 2
    assert "mpp 'fast' is not a number" in capfd.readouterr().err
