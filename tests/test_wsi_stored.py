"""Direct decoding of stored TIFF tiles (histofm.wsi.stored) against OpenSlide's read_region."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histofm.data import sample_path
from histofm.errors import HistofmError
from histofm.wsi import open_slide

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")


def _openslide_rgb(slide: object, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """OpenSlide's region composited on white (transparent outside the slide), as ``(h, w, 3)`` uint8."""
    rgba = np.asarray(slide.read_region(location, level, size)).astype(np.float64)  # (h, w, 4)
    alpha = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)


def _boxes(width: int, height: int, tile: int, stored: int) -> list[tuple[int, int, int, int]]:
    """Regions straddling stored-tile seams, at the corners, and over the right / bottom edges."""
    s = stored
    return [
        (0, 0, tile, tile),
        (s - 7, s - 11, tile, tile),  # across a vertical and a horizontal seam
        (2 * s - 1, s + 3, tile, 2),  # a thin strip over a seam
        (s, 0, s, s),  # exactly one stored tile
        (width - tile, height - tile, tile, tile),  # the last whole tile (a partial stored tile)
        (width - tile // 2, height - tile // 3, tile, tile),  # over the right and bottom edges: white outside
        (width - 1, 0, 1, height),  # the last column
    ]


def test_aperio_sample_equals_openslide() -> None:
    """Bundled real Aperio slide (240 px JPEG tiles with JPEGTables): bit-identical to OpenSlide."""
    path = sample_path("cmu_small_region")
    ref = openslide.OpenSlide(str(path))
    with open_slide(path, backend="openslide") as ours:
        assert ours.decoder(0) == "stored-tiles"
        w, h = ours.dimensions
        worst = 0
        for x, y, bw, bh in _boxes(w, h, 224, 240):
            got = ours.read_region_array((x, y), 0, (bw, bh))
            want = _openslide_rgb(ref, (x, y), 0, (bw, bh))
            assert got.shape == want.shape == (bh, bw, 3)
            worst = max(worst, int(np.abs(got.astype(np.int16) - want).max()))
        assert worst == 0, f"max abs difference {worst} against OpenSlide"
    ref.close()


def test_raster_reads_decode_each_stored_tile_once() -> None:
    """A raster of 224 px tiles over 240 px stored tiles decodes each stored tile exactly once."""
    with open_slide(sample_path("cmu_small_region"), backend="openslide") as ours:
        w, h = ours.dimensions
        stored = ours._stored
        assert stored is not None
        for y in range(0, h - 224 + 1, 224):
            for x in range(0, w - 224 + 1, 224):
                ours.read_region_array((x, y), 0, (224, 224))
        rows, cols = ((h // 224) * 224 - 1) // 240 + 1, ((w // 224) * 224 - 1) // 240 + 1
        assert stored.decoded == rows * cols  # naive reads would decode about 3.7 per tile


def _pyramid(path: Path, compression: str, tile: int = 256, stripped_level: int | None = None) -> np.ndarray:
    """A 4-level pyramidal TIFF (1x, 2x, 4x, 8x) of real pixels; sides divisible by 8 so downsamples are exact."""
    from PIL import Image

    with open_slide(sample_path("cmu_small_region")) as s:
        base = s.read_region_array((0, 0), 0, (1000, 1304))  # (1304, 1000, 3)
    h, w = base.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for i, k in enumerate((1, 2, 4, 8)):
            img = base if k == 1 else np.asarray(Image.fromarray(base).resize((w // k, h // k), Image.Resampling.BOX))
            kwargs = {} if i == stripped_level else {"tile": (tile, tile)}
            tw.write(img, photometric="rgb", compression=compression, subfiletype=int(i > 0),
                     resolution=(1e4 / (0.25 * k),) * 2, resolutionunit="CENTIMETER", **kwargs)
    return base


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_written_pyramid_equals_openslide_on_every_level(tmp_path: Path, compression: str) -> None:
    """A pyramid written with tifffile: level 0 and the reduced levels, seams and edges, equal to OpenSlide."""
    path = tmp_path / "pyramid.tif"
    _pyramid(path, compression)
    ref = openslide.OpenSlide(str(path))
    with open_slide(path, backend="openslide") as ours:
        assert ours.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        worst = 0
        for level in (0, 1, 2):
            assert ours.decoder(level) == "stored-tiles"
            ds = int(ours.level_downsamples[level])
            lw, lh = ours.level_dimensions[level]
            for x, y, bw, bh in _boxes(lw, lh, 96, 256):
                got = ours.read_region_array((x * ds, y * ds), level, (bw, bh))
                want = _openslide_rgb(ref, (x * ds, y * ds), level, (bw, bh))
                worst = max(worst, int(np.abs(got.astype(np.int16) - want).max()))
        assert worst == 0, f"max abs difference {worst} against OpenSlide"
        # Between two pixels of a reduced level OpenSlide interpolates: the backend reads those.
        assert ours._direct((3, 0), 1, (8, 8)) is None
        np.testing.assert_array_equal(ours.read_region_array((3, 5), 1, (40, 30)), _openslide_rgb(ref, (3, 5), 1, (40, 30)))
    ref.close()


def test_tiffslide_backend_and_opt_out(tmp_path: Path) -> None:
    """tiffslide readers decode directly too; ``direct=False`` and non-tiled levels leave it to the backend."""
    pytest.importorskip("tiffslide")
    path = tmp_path / "pyramid.tif"
    _pyramid(path, "jpeg", tile=128, stripped_level=3)
    with open_slide(path, backend="tiffslide") as ours, open_slide(path, backend="tiffslide", direct=False) as plain:
        assert [ours.decoder(i) for i in range(4)] == ["stored-tiles"] * 3 + ["tiffslide"]
        assert plain.decoder(0) == "tiffslide"
        for level, (x, y) in [(0, (250, 130)), (2, (4 * 100, 4 * 60)), (3, (8, 16))]:
            np.testing.assert_array_equal(
                ours.read_region_array((x, y), level, (64, 64)), plain.read_region_array((x, y), level, (64, 64))
            )


def test_corrupt_tile_is_one_sentence(tmp_path: Path) -> None:
    """Garbage in one stored tile's bytes: the user gets one sentence, not a codec traceback."""
    path = tmp_path / "broken.tif"
    _pyramid(path, "jpeg")
    with tifffile.TiffFile(path) as tif:
        offset = int(tif.pages[0].dataoffsets[0])
    data = bytearray(path.read_bytes())
    data[offset : offset + 400] = b"\x00" * 400
    path.write_bytes(bytes(data))
    with open_slide(path, backend="openslide") as ours, pytest.raises(HistofmError, match="truncated or corrupt"):
        ours.read_region_array((0, 0), 0, (64, 64))


def test_banded_thumbnail_reads_whole_level_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thumbnail built in bands from a level whose downsample is not whole (4.0046 here) takes the
    level's own rows from the stored tiles: closer to the one-piece thumbnail than OpenSlide's bands,
    which start between two rows and are interpolated."""
    from PIL import Image

    from histofm.wsi import readers

    with open_slide(sample_path("cmu_small_region")) as s:
        base = s.read_region_array((0, 0), 0, (1301, 2001))  # odd sides: downsample 4.0046
    path = tmp_path / "odd.tif"
    with tifffile.TiffWriter(path) as tw:
        for i, k in enumerate((1, 4)):
            img = base if k == 1 else np.asarray(Image.fromarray(base).resize((1301 // k, 2001 // k), Image.Resampling.BOX))
            tw.write(img, tile=(128, 128), photometric="rgb", compression="jpeg", subfiletype=i,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path, backend="openslide") as ours, open_slide(path, backend="openslide", direct=False) as plain:
        assert ours.level_downsamples[1] != 4.0
        whole = np.asarray(plain.thumbnail(300), dtype=np.float32)  # one piece: no bands
        monkeypatch.setattr(readers, "_THUMBNAIL_BAND_PIXELS", 20_000)  # about 7 bands
        banded = np.asarray(ours.thumbnail(300), dtype=np.float32)
        backend_banded = np.asarray(plain.thumbnail(300), dtype=np.float32)
    assert whole.shape == banded.shape == backend_banded.shape
    assert np.abs(banded - whole).mean() < np.abs(backend_banded - whole).mean()
