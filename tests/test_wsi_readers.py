"""Slide readers on the bundled real Aperio slide: backends agree, pyramid levels, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from histofm import HistofmError
from histofm.data import sample_path
from histofm.wsi import open_slide

SVS = sample_path("cmu_small_region")
# Facts about the sample from its source (shared/DATA.md), not from our reader.
SVS_SIZE = (2220, 2967)
SVS_MPP = 0.499


@pytest.fixture(scope="module")
def level0() -> np.ndarray:
    """The whole sample at level 0, decoded by tifffile (independent of our readers)."""
    with tifffile.TiffFile(SVS) as tif:
        return tif.pages[0].asarray()  # (H, W, 3)


def _pyramid(path, level0: np.ndarray, *, subifds: bool, tint: bool) -> list[np.ndarray]:
    """A 3-level pyramidal TIFF (1x, 2x, 4x) with mpp resolution tags.

    With ``tint``, level 1 has its blue channel zeroed and level 2 its red channel, so a
    test can tell which level a pixel came from.
    """
    levels = [level0]
    for k in (2, 4):
        h, w = level0.shape[:2]
        small = np.asarray(Image.fromarray(level0).resize((w // k, h // k), Image.Resampling.BOX)).copy()
        if tint:
            small[..., 2 if k == 2 else 0] = 0
        levels.append(small)
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(levels):
            px_per_cm = 1e4 / (SVS_MPP * 2**i)
            kw = dict(tile=(256, 256), photometric="rgb", compression="zlib", resolution=(px_per_cm, px_per_cm),
                      resolutionunit="CENTIMETER")
            if subifds:
                tw.write(img, subifds=2, **kw) if i == 0 else tw.write(img, subfiletype=1, **kw)
            else:
                tw.write(img, subfiletype=0 if i == 0 else 1, **kw)
    return levels


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory, level0):
    root = tmp_path_factory.mktemp("pyr")
    paths = {}
    for subifds in (False, True):
        paths[subifds] = root / f"pyr_subifds{int(subifds)}.tif"
        levels = _pyramid(paths[subifds], level0, subifds=subifds, tint=True)
    return paths, levels


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_sample_metadata_and_pixels(backend, level0):
    with open_slide(SVS, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions == SVS_SIZE
        assert slide.level_count == 1 and slide.level_downsamples == (1.0,)
        assert slide.mpp == pytest.approx(SVS_MPP)
        region = np.asarray(slide.read_region((1000, 1500), 0, (300, 200)), dtype=np.float32)
        assert region.shape == (200, 300, 3)
        ref = level0[1500:1700, 1000:1300].astype(np.float32)
        assert np.abs(region - ref).mean() < 2.0  # JPEG decoders may differ by a grey level
        # 0.5 um/px on a 0.499 um/px slide: level 0, no resampling.
        tile = np.asarray(slide.read_region_mpp(1000, 1500, 224, 0.5), dtype=np.float32)
        assert tile.shape == (224, 224, 3)
        assert np.abs(tile - level0[1500:1724, 1000:1224]).mean() < 2.0


def test_region_outside_slide_is_white():
    with open_slide(SVS) as slide:
        w, h = slide.dimensions
        edge = np.asarray(slide.read_region((w - 100, h - 50), 0, (224, 224)))
        assert edge.shape == (224, 224, 3)
        assert (edge[60:, :] == 255).all() and (edge[:, 110:] == 255).all()
        assert edge[:40, :90].mean() < 250  # the in-slide part is real pixels (slide corner is grey-white)
        far = np.asarray(slide.read_region((-500, -500), 0, (64, 64)))
        assert (far == 255).all()


@pytest.mark.parametrize(
    "backend,subifds", [("openslide", False), ("tiffslide", False), ("tiffslide", True)]
)
def test_pyramid_reads_the_right_level(pyramids, backend, subifds):
    paths, levels = pyramids
    with open_slide(paths[subifds], backend=backend) as slide:
        assert slide.level_count == 3
        assert slide.mpp == pytest.approx(SVS_MPP, rel=1e-3)  # from the resolution tags
        assert slide.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
        assert slide.best_level_for_mpp(0.5) == 0
        assert slide.best_level_for_mpp(1.0) == 1
        assert slide.best_level_for_mpp(2.0) == 2
        assert slide.best_level_for_mpp(1.5) == 1  # never read coarser than asked
        x, y = 800, 1200
        fine = np.asarray(slide.read_region_mpp(x, y, 224, 0.5), dtype=np.float32)
        mid = np.asarray(slide.read_region_mpp(x, y, 112, 1.0), dtype=np.float32)
        coarse = np.asarray(slide.read_region_mpp(x, y, 56, 2.0), dtype=np.float32)
    assert fine.shape == (224, 224, 3) and mid.shape == (112, 112, 3) and coarse.shape == (56, 56, 3)
    assert fine[..., 2].mean() > 150 and fine[..., 0].mean() > 150  # level 0: untinted
    assert mid[..., 2].max() == 0 and mid[..., 0].mean() > 150  # level 1: blue removed
    assert coarse[..., 0].max() == 0 and coarse[..., 2].mean() > 150  # level 2: red removed
    # Same place: level 1's pixels at (x/2, y/2). Backends map level-0 to level coordinates
    # differently (tiffslide floors, OpenSlide interpolates sub-pixel offsets): allow 1 px.
    best = 0.0
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            ref = levels[1][y // 2 + dy : y // 2 + dy + 112, x // 2 + dx : x // 2 + dx + 112, 0]
            best = max(best, np.corrcoef(mid[..., 0].ravel(), ref.astype(np.float32).ravel())[0, 1])
    assert best > 0.97


def test_plain_image_needs_mpp_and_reads_exact_pixels(tmp_path, level0):
    crop = level0[1000:1600, 600:1400]
    png = tmp_path / "crop.png"
    Image.fromarray(crop).save(png)
    slide = open_slide(png)
    assert slide.backend == "image" and slide.dimensions == (800, 600) and not slide.has_mpp
    with pytest.raises(HistofmError, match="--mpp-override"):
        _ = slide.mpp
    slide = open_slide(png, mpp=0.25)
    assert slide.mpp == 0.25
    np.testing.assert_array_equal(np.asarray(slide.read_region((10, 20), 0, (50, 40))), crop[20:60, 10:60])
    # A plain TIFF with resolution tags carries its mpp; a 72 dpi picture does not.
    tif = tmp_path / "crop.tif"
    tifffile.imwrite(tif, crop, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    assert open_slide(tif, backend="image").mpp == pytest.approx(0.25)
    tifffile.imwrite(tif, crop, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert not open_slide(tif, backend="image").has_mpp


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    data = SVS.read_bytes()
    (root / "text.svs").write_text("this is a note, not a slide\n")
    (root / "truncated.svs").write_bytes(data[: len(data) // 2])
    (root / "empty.svs").write_bytes(b"")
    return root


@pytest.mark.parametrize(
    "name,expected",
    [
        ("missing.svs", "not found"),
        ("text.svs", "is not a slide or image"),
        ("truncated.svs", "truncated or corrupt"),
        ("empty.svs", "empty"),
    ],
)
def test_bad_files_one_sentence(bad_files, name, expected):
    with pytest.raises(HistofmError) as info:
        open_slide(bad_files / name)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and message.endswith(".")


def test_bad_arguments():
    with pytest.raises(HistofmError, match="backend"):
        open_slide(SVS, backend="vips")
    with pytest.raises(HistofmError, match="positive"):
        open_slide(SVS, mpp=-1)
    with open_slide(SVS) as slide:
        with pytest.raises(HistofmError, match="levels 0..0"):
            slide.read_region((0, 0), 3, (10, 10))
        with pytest.raises(HistofmError, match="positive"):
            slide.read_region_mpp(0, 0, 224, 0.0)


def test_thumbnail_of_a_large_level_is_built_in_bands(monkeypatch, level0):
    import histofm.wsi.readers as readers

    with open_slide(SVS) as slide:
        whole = np.asarray(slide.thumbnail(700), dtype=np.float32)
        monkeypatch.setattr(readers, "_THUMBNAIL_BAND_PIXELS", 500_000)  # forces about 14 bands
        banded = np.asarray(slide.thumbnail(700), dtype=np.float32)
    assert whole.shape == banded.shape == (700, 524, 3)
    assert np.abs(whole - banded).mean() < 1.5  # only rows at band edges differ, slightly
    ref = np.asarray(Image.fromarray(level0).resize((524, 700), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(whole - ref).mean() < 1.0
