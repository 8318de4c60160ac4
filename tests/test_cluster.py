"""Tissue-phenotype cluster map of the bundled slide: files, geometry, spatial coherence, CLI and bad input."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from histofm.cli import main
from histofm.data import sample_path
from histofm.errors import HistofmError
from histofm.learning.cluster_map import cluster_colour, cluster_map, overlay
from histofm.models.vit import VisionTransformer
from histofm.wsi import open_slide

SLIDE = sample_path("cmu_small_region")


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_thread):
    # A small random ViT: no weights are needed for the map to follow tissue structure,
    # since tiles that look alike get alike embeddings.
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=96, depth=1, num_heads=3)
    out = tmp_path_factory.mktemp("cluster")
    return cluster_map(SLIDE, out, model=model, k=4, tile_size=64, target_mpp=1.0, device="cpu", progress=False)


def test_outputs_are_written(result) -> None:
    for kind in ("map", "prototypes", "csv", "features"):
        assert result.paths[kind].is_file()
    with Image.open(result.paths["map"]) as im:
        assert im.format == "PNG" and im.width > 500
    with Image.open(result.paths["prototypes"]) as im:
        assert im.format == "PNG"
    with open(result.paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.labels) > 50
    assert [int(r["cluster"]) for r in rows] == result.labels.tolist()
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(c) for c in result.coords.tolist()]
    assert not list(result.paths["map"].parent.glob("*.tmp"))


def test_clusters_are_a_kmeans_fixed_point_numbered_by_size(result) -> None:
    with h5py.File(result.paths["features"]) as f:
        feats = f["features"][:]
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    d = ((x[:, None] - result.centroids[None]) ** 2).sum(-1)
    assert np.array_equal(d.argmin(1), result.labels)  # each tile at its nearest centroid
    for j in range(len(result.centroids)):  # each centroid the mean of its tiles
        np.testing.assert_allclose(result.centroids[j], x[result.labels == j].mean(0), atol=1e-4)
    assert list(result.counts) == sorted(result.counts, reverse=True)
    np.testing.assert_allclose(result.distances, d.min(1), atol=1e-5)


def test_clusters_are_spatially_coherent_on_real_tissue(result) -> None:
    # Neighbouring tiles of real tissue share a phenotype far more often than chance.
    step = result.size_level0
    grid = {(round(x / step), round(y / step)): int(j) for (x, y), j in zip(result.coords, result.labels)}

    def same_neighbour_rate(labels: dict) -> float:
        pairs = [(v, labels[(i + di, j + dj)]) for (i, j), v in labels.items() for di, dj in ((1, 0), (0, 1))
                 if (i + di, j + dj) in labels]
        return float(np.mean([a == b for a, b in pairs]))

    observed = same_neighbour_rate(grid)
    rng = np.random.default_rng(0)
    keys, values = list(grid), np.array(list(grid.values()))
    shuffled = [same_neighbour_rate(dict(zip(keys, rng.permutation(values)))) for _ in range(100)]
    assert observed > np.mean(shuffled) + 4 * np.std(shuffled)


def test_overlay_paints_each_tile_in_its_cluster_colour(result) -> None:
    with open_slide(SLIDE) as reader:
        thumb, over = overlay(reader, result, max_size=512, alpha=0.5)
        w0, h0 = reader.dimensions
    sy, sx = thumb.shape[0] / h0, thumb.shape[1] / w0
    for i in range(0, len(result.labels), 7):
        x, y = result.coords[i]
        cx, cy = int((x + result.size_level0 / 2) * sx), int((y + result.size_level0 / 2) * sy)
        expected = 0.5 * thumb[cy, cx].astype(float) + 0.5 * np.array(cluster_colour(int(result.labels[i])))
        np.testing.assert_allclose(over[cy, cx], expected, atol=1.0)
    untouched = np.ones(thumb.shape[:2], bool)
    for x, y in result.coords:
        untouched[int(y * sy) : int((y + result.size_level0) * sy) + 2, int(x * sx) : int((x + result.size_level0) * sx) + 2] = False
    assert np.array_equal(over[untouched], thumb[untouched])  # background is left as it is


def test_cli_from_a_feature_file(result, tmp_path, capsys) -> None:
    code = main(["cluster", str(SLIDE), "--features", str(result.paths["features"]), "--k", "3", "--out",
                 str(tmp_path), "--prototypes", "2", "--device", "cpu"])
    assert code == 0
    assert (tmp_path / "cmu_small_region_clusters.png").is_file()
    assert (tmp_path / "cmu_small_region_prototypes.png").is_file()
    with open(tmp_path / "cmu_small_region_clusters.csv") as f:
        assert {int(r["cluster"]) for r in csv.DictReader(f)} == {0, 1, 2}
    assert "3 clusters" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,match",
    [([], "--model NAME"), (["--k", "100000"], "fewer than k"), (["--k", "0"], "at least 1"),
     (["--model", "vit_nonexistent"], "Unknown model")],
)
def test_cli_bad_input(result, tmp_path, capsys, extra: list[str], match: str) -> None:
    args = ["cluster", str(SLIDE), "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    if extra[:1] != ["--model"] and extra != []:
        args += ["--features", str(result.paths["features"])]
    assert main(args + extra) == 2
    assert match in capsys.readouterr().err


def test_cli_missing_slide_and_foreign_features(result, tmp_path, capsys) -> None:
    assert main(["cluster", str(tmp_path / "nope.svs"), "--features", str(result.paths["features"]),
                 "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    small = tmp_path / "small.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(small)
    assert main(["cluster", str(small), "--slide-mpp", "0.5", "--features", str(result.paths["features"]),
                 "--out", str(tmp_path)]) == 2
    assert "outside" in capsys.readouterr().err


def test_a_model_name_without_weights_is_refused(tmp_path) -> None:
    with pytest.raises(HistofmError, match="needs weights"):
        cluster_map(SLIDE, tmp_path, model="vit_tiny_patch16_224", k=2, device="cpu", progress=False)
    assert not any(tmp_path.iterdir())
