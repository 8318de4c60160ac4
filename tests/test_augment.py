"""Augmentations, HED colour deconvolution (oracle: scikit-image) and the tile datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from histofm import HistofmError
from histofm.data import sample_path
from histofm.data.augment import MultiView, RandomRotate90, ViewConfig, eval_view, two_views, view_transform
from histofm.data.datasets import ImageFolderTiles, bundled_tiles, tile_dataset
from histofm.data.stain import HED_FROM_RGB, RGB_FROM_HED, HEDJitter, hed_to_rgb, rgb_to_hed
from histofm.train.data import seeded

skcolor = pytest.importorskip("skimage.color")


def _he_crop(size: int = 96) -> np.ndarray:
    with Image.open(sample_path("hgsc_nest")) as im:
        return np.array(im.convert("RGB"))[300 : 300 + size, 400 : 400 + size]


# ------------------------------------------------------------------------------ HED
def test_hed_matrices_are_ruifrok_johnston() -> None:
    torch.testing.assert_close(RGB_FROM_HED @ HED_FROM_RGB, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(HED_FROM_RGB, torch.from_numpy(skcolor.hed_from_rgb))


@pytest.mark.parametrize("which", ["he", "ihc", "random"])
def test_rgb_to_hed_and_back_match_skimage(which: str) -> None:
    if which == "he":
        rgb = _he_crop()
    elif which == "ihc":
        from skimage import data

        rgb = data.immunohistochemistry()[:128, :128]
    else:
        rgb = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    ref_hed = skcolor.rgb2hed(rgb)  # (H, W, 3)
    x = torch.from_numpy(rgb).permute(2, 0, 1).double() / 255
    ours = rgb_to_hed(x)
    torch.testing.assert_close(ours.permute(1, 2, 0), torch.from_numpy(ref_hed), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(hed_to_rgb(ours).permute(1, 2, 0), torch.from_numpy(skcolor.hed2rgb(ref_hed)), rtol=1e-7, atol=1e-9)


def test_hed_jitter_scales_and_shifts_each_stain_within_bounds() -> None:
    x = torch.from_numpy(_he_crop()).permute(2, 0, 1).double() / 255
    sigma, bias = 0.2, 0.02
    hed = rgb_to_hed(x)
    outs = []
    for seed in range(4):
        with seeded(seed):
            y = HEDJitter(sigma, bias)(x)
        outs.append(y)
        hed_y = rgb_to_hed(y)
        for c in range(2):  # haematoxylin, eosin: c' = alpha c + beta on unclamped pixels
            a, b = hed[c].flatten(), hed_y[c].flatten()
            ok = (a > 0.01) & (b > 0.01) & (y.min(0).values.flatten() > 1e-3)
            slope, icpt = np.polyfit(a[ok].numpy(), b[ok].numpy(), 1)
            assert 1 - sigma - 1e-3 <= slope <= 1 + sigma + 1e-3
            assert abs(icpt) <= bias + 1e-3
    assert not torch.allclose(outs[0], outs[1])  # random per call
    identity = HEDJitter(0.0, 0.0)(x)
    ok = rgb_to_hed(x).min(0).values > 0  # pixels where rgb2hed did not clamp round-trip exactly
    torch.testing.assert_close(identity[:, ok], x[:, ok])
    u8 = HEDJitter(0.1, 0.01)(torch.from_numpy(_he_crop()).permute(2, 0, 1))
    assert u8.dtype == torch.uint8 and u8.shape == (3, 96, 96)
    assert HEDJitter(0.5, 0.1, p=0.0)(x) is x


# ----------------------------------------------------------------------- transforms
def test_rotate90_gives_all_four_rotations() -> None:
    x = torch.arange(9.0).reshape(1, 3, 3)
    seen = set()
    for s in range(40):
        with seeded(s):
            y = RandomRotate90()(x)
        assert any(torch.equal(y, torch.rot90(x, k, (1, 2))) for k in range(4))
        seen.add(tuple(y.flatten().tolist()))
    assert len(seen) == 4


def test_view_transform_is_random_but_seeded() -> None:
    img = Image.fromarray(_he_crop(80))
    t = view_transform(ViewConfig(size=32, hed_p=0.5, solarize_p=0.2))
    with seeded(1):
        a = t(img)
    with seeded(1):
        b = t(img)
    with seeded(2):
        c = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    views = two_views(ViewConfig(size=24))(img)
    assert len(views) == 2 and views[0].shape == (3, 24, 24) and not torch.equal(views[0], views[1])
    assert len(MultiView([view_transform(ViewConfig(size=16))] * 3)(img)) == 3
    e = eval_view(40)(img)
    assert e.shape == (3, 40, 40) and torch.equal(e, eval_view(40)(img))
    # eval_view normalises with ImageNet statistics: undo it and compare with the resized input
    raw = np.asarray(img.resize((40, 40), Image.Resampling.BILINEAR)).astype(np.float32) / 255
    back = e * torch.tensor([0.229, 0.224, 0.225])[:, None, None] + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    assert abs(back.permute(1, 2, 0).numpy() - raw).mean() < 0.03


# ------------------------------------------------------------------------- datasets
def test_image_folder_is_recursive_with_classes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for sub, n in (("a", 2), ("b/deeper", 3)):
        (tmp_path / sub).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / sub / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderTiles(tmp_path)
    assert len(ds) == 5 and ds.classes == ["a", "b"] and ds.labels == [0, 0, 1, 1, 1]
    assert ds[3].mode == "RGB" and ds[3].size == (8, 8)
    with pytest.raises(HistofmError, match="No images"):
        ImageFolderTiles(tmp_path / "b", recursive=False)
    with pytest.raises(HistofmError, match="does not exist"):
        ImageFolderTiles(tmp_path / "missing")
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    broken = ImageFolderTiles(tmp_path)
    with pytest.raises(HistofmError, match="Cannot read image"):
        broken[broken.paths.index(tmp_path / "a" / "broken.png")]


def test_bundled_tiles_regions_tissue_and_modes() -> None:
    left = bundled_tiles(64, sources=("hgsc_nest", "hgsc_stroma"), region=(0, 0, 0.5, 1))
    right = bundled_tiles(64, sources=("hgsc_nest", "hgsc_stroma"), region=(0.5, 0, 1, 1))
    assert left.classes == ["hgsc_nest", "hgsc_stroma"] and set(left.labels) == {0, 1}
    assert (left.coords[:, 0] + 64 <= 750).all() and (right.coords[:, 0] >= 750).all()  # disjoint pixels
    tile = np.asarray(left[0])
    with Image.open(sample_path("hgsc_nest")) as im:
        x, y = left.coords[0]
        np.testing.assert_array_equal(tile, np.asarray(im.convert("RGB"))[y : y + 64, x : x + 64])
    all_cmu = bundled_tiles(128, sources=("cmu_small_region",), min_tissue=0.0)
    tissue_cmu = bundled_tiles(128, sources=("cmu_small_region",))
    assert len(tissue_cmu) < 0.8 * len(all_cmu)  # white glass removed
    rnd = bundled_tiles(32, mode="random", num_per_source=10, out_size=16, seed=3)
    assert len(rnd) == 30 and rnd[0].size == (16, 16)
    again = bundled_tiles(32, mode="random", num_per_source=10, out_size=16, seed=3)
    np.testing.assert_array_equal(rnd.coords, again.coords)
    with pytest.raises(HistofmError, match="Unknown bundled source"):
        bundled_tiles(sources=("mnist",))
    with pytest.raises(HistofmError, match="region"):
        bundled_tiles(region=(0.5, 0, 0.2, 1))


def test_tile_dataset_dispatch(tmp_path) -> None:
    assert isinstance(tile_dataset("bundled", tile_size=256), type(bundled_tiles(256)))
    slides = tile_dataset(sample_path("cmu_small_region"), tile_size=256, target_mpp=1.0)
    assert len(slides) > 5 and slides[0].size == (256, 256) and slides.classes == ["cmu_small_region"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    assert len(tile_dataset(tmp_path)) == 1
    with pytest.raises(HistofmError, match="does not exist"):
        tile_dataset(tmp_path / "nope")
