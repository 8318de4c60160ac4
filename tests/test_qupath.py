"""QuPath GeoJSON: valid geometry (shapely), polygons equal to the tiles, and the cluster map's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from shapely.geometry import box, shape

from histofm import HistofmError
from histofm.data import sample_path
from histofm.learning.cluster_map import cluster_colour, cluster_map
from histofm.wsi.qupath import score_classes, tile_features, write_geojson


def check_tiles(collection: dict, coords: np.ndarray, size: float) -> None:
    """Every feature is a valid polygon equal to its tile's square, in level-0 pixels, with QuPath's properties."""
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(coords)
    ids = set()
    for feat, (x, y) in zip(collection["features"], coords):
        geom = shape(feat["geometry"])
        assert feat["type"] == "Feature" and geom.geom_type == "Polygon" and geom.is_valid
        assert geom.equals(box(x, y, x + size, y + size)) and geom.area == pytest.approx(size * size)
        props = feat["properties"]
        assert props["objectType"] in ("tile", "detection", "annotation")
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3 and all(0 <= c <= 255 for c in cls["color"])
        ids.add(feat["id"])
    assert len(ids) == len(coords)


def test_tile_features_geometry_and_properties(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [448, 0], [448, 896], [1000, 37]])
    scores = np.array([0.0, 0.35, 0.95, 1.0])
    names, colours = score_classes(scores)
    assert names == ["score 0.0-0.1", "score 0.3-0.4", "score 0.9-1.0", "score 0.9-1.0"]
    col = tile_features(coords, 448, names, colours, {"score": scores, "attention": np.array([1, 2, 3, np.nan])},
                        object_type="detection", id_prefix="S1")
    check_tiles(col, coords, 448)
    assert col["features"][1]["properties"]["measurements"] == {"score": 0.35, "attention": 2.0}
    assert "attention" not in col["features"][3]["properties"]["measurements"]  # NaN is not valid JSON
    path = write_geojson(tmp_path / "t.geojson", col)
    assert json.loads(path.read_text()) == col and oct(path.stat().st_mode)[-3:] in ("644", "664")
    with pytest.raises(HistofmError, match="object type"):
        tile_features(coords, 448, names, colours, object_type="cell")
    with pytest.raises(HistofmError, match="one value per tile"):
        tile_features(coords, 448, names, colours, {"score": scores[:2]})


def test_cluster_map_writes_tables_and_geojson(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(0, 2000, 224), np.arange(0, 2700, 224))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    feats = rng.normal(size=(len(coords), 6)).astype(np.float32)
    feats[:, 0] += np.where(coords[:, 0] < 1000, 5.0, -5.0)  # two spatial halves, two clusters
    path = tmp_path / "cmu_small_region.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 224
        f.attrs.update({"tile_size": 224, "mpp": 0.5})
    res = cluster_map(sample_path("cmu_small_region"), tmp_path / "out", features=path, k=2, n_prototypes=1,
                      max_size=256, progress=False)
    with h5py.File(res.paths["h5"]) as f:
        np.testing.assert_array_equal(f["coords"][:], coords)
        np.testing.assert_array_equal(f["cluster"][:], res.labels)
        assert f.attrs["patch_size_level0"] == 224
    col = json.loads(res.paths["geojson"].read_text())
    check_tiles(col, coords, 224)
    for feat, j in zip(col["features"], res.labels):
        assert feat["properties"]["classification"] == {"name": f"cluster {j}", "color": list(cluster_colour(int(j)))}
    left = res.labels[coords[:, 0] < 1000]
    assert len(set(left.tolist())) == 1 and left[0] not in res.labels[coords[:, 0] >= 1000]
