"""TRIDENT and CLAM layouts on a pyramidal 0.25 um/px TIFF extracted at 0.5 um/px.

Each tool's reader is re-implemented here from its documented meaning of the attributes,
over OpenSlide directly (not histofm's readers), and must give back exactly the pixels
histofm encoded (captured by a recording encoder):

* CLAM (``Whole_Slide_Bag_FP``): ``read_region(coord, patch_level, (patch_size, patch_size))``;
* TRIDENT (``WSIPatcher``): level for the downsample ``level0_magnification /
  target_magnification``, ``round(patch_size_level0 / level_downsample)`` pixels read there,
  resized to ``patch_size``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import tifffile
import torch
from PIL import Image

from histofm.data import sample_path
from histofm.registry import IMAGENET_MEAN, IMAGENET_STD
from histofm.wsi import open_slide
from histofm.wsi.features import ExtractConfig, extract_features, read_provenance

SVS = sample_path("cmu_small_region")


class Recorder(torch.nn.Module):
    """An identity-like encoder: keeps every normalised batch it sees, returns one number per tile."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 1)
        self.batches.append(x.detach().clone())
        return x.mean(dim=(1, 2, 3))[:, None]

    def pixels(self) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 tiles as read, before normalisation."""
        x = torch.cat(self.batches)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        return torch.round((x * std + mean) * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pyramid(path: Path, factors: tuple[int, ...]) -> Path:
    """A 0.25 um/px tiled pyramidal TIFF: 680 x 680 px of the real slide upsampled to 1360 x 1360."""
    with open_slide(SVS) as s:
        crop = s.read_region((900, 1600), 0, (680, 680))
    level0 = np.asarray(crop.resize((1360, 1360), Image.Resampling.BICUBIC))
    with tifffile.TiffWriter(path) as tw:
        for i, k in enumerate(factors):
            img = level0 if k == 1 else np.asarray(Image.fromarray(level0).resize((1360 // k, 1360 // k), Image.Resampling.BOX))
            tw.write(img, tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=int(i > 0),
                     resolution=(1e4 / (0.25 * k),) * 2, resolutionunit="CENTIMETER")
    return path


def _extract(slide: Path, out: Path, layout: str) -> tuple[Recorder, Path]:
    rec = Recorder()
    cfg = ExtractConfig(target_mpp=0.5, tile_size=224, min_tissue=0, layout=layout, device="cpu", batch_size=4)
    report = extract_features([slide], rec, out, config=cfg, progress=False)
    assert [r.status for r in report.results] == ["done"], report.results
    return rec, report.results[0].output


def _clam_read(wsi: openslide.OpenSlide, coords_attrs: dict, xy: np.ndarray) -> np.ndarray:
    size, level = int(coords_attrs["patch_size"]), int(coords_attrs["patch_level"])
    return np.asarray(wsi.read_region((int(xy[0]), int(xy[1])), level, (size, size)).convert("RGB"))


def _trident_read(wsi: openslide.OpenSlide, coords_attrs: dict, xy: np.ndarray) -> np.ndarray:
    downsample = float(coords_attrs["level0_magnification"]) / float(coords_attrs["target_magnification"])
    usable = [i for i, d in enumerate(wsi.level_downsamples) if d <= downsample * 1.01]
    level = max(usable, key=lambda i: wsi.level_downsamples[i])
    read = round(int(coords_attrs["patch_size_level0"]) / wsi.level_downsamples[level])
    tile = wsi.read_region((int(xy[0]), int(xy[1])), level, (read, read)).convert("RGB")
    size = int(coords_attrs["patch_size"])
    return np.asarray(tile if read == size else tile.resize((size, size), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    return _pyramid(tmp_path_factory.mktemp("pyr") / "pyr40x.tif", (1, 2, 4))


def test_each_tool_reads_back_exactly_the_encoded_pixels(pyramid, tmp_path) -> None:
    wsi = openslide.OpenSlide(str(pyramid))
    for layout, reader in (("trident", _trident_read), ("clam", _clam_read)):
        rec, h5 = _extract(pyramid, tmp_path / layout, layout)
        encoded = rec.pixels()
        with h5py.File(h5, "r") as f:
            coords, attrs, feats = f["coords"][:], dict(f["coords"].attrs), f["features"][:]
        assert len(coords) == len(encoded) == 9  # 1360 px at 0.25 um/px: a 3 x 3 grid of 448 level-0 px tiles
        for i, xy in enumerate(coords):
            np.testing.assert_array_equal(reader(wsi, attrs, xy), encoded[i], err_msg=f"{layout} tile {i}")
        if layout == "trident":
            assert h5 == tmp_path / "trident" / "features_Recorder" / "pyr40x.h5"
            assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 448
            assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20
        else:
            assert h5 == tmp_path / "clam" / "h5_files" / "pyr40x.h5"
            assert attrs["patch_level"] == 1 and attrs["patch_size"] == 224  # the 2x level serves 0.5 um/px
            pt = torch.load(tmp_path / "clam" / "pt_files" / "pyr40x.pt", weights_only=True)
            assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32
            np.testing.assert_array_equal(pt.numpy(), feats)
            # A rerun skips the slide; a missing .pt makes it redo the slide (the pair belongs together).
            cfg = ExtractConfig(target_mpp=0.5, tile_size=224, min_tissue=0, layout="clam", device="cpu")
            again = extract_features([pyramid], Recorder(), tmp_path / "clam", config=cfg, progress=False)
            assert again.results[0].status == "skipped"
            (tmp_path / "clam" / "pt_files" / "pyr40x.pt").unlink()
            again = extract_features([pyramid], Recorder(), tmp_path / "clam", config=cfg, progress=False)
            assert again.results[0].status == "done" and (tmp_path / "clam" / "pt_files" / "pyr40x.pt").is_file()
    wsi.close()


def test_read_provenance_of_a_file_from_another_tool(tmp_path) -> None:
    path = tmp_path / "theirs.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 4), np.float32))
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64)).attrs["patch_size"] = 256
    prov = read_provenance(path)
    assert prov["weights_source"] == "unrecorded" and prov["model_name"] is None and prov["mpp"] is None


def test_clam_patch_size_is_the_size_read_when_no_level_matches(tmp_path) -> None:
    """Without a 2x level histofm reads 448 px at level 0: CLAM must be told 448, not 224."""
    slide = _pyramid(tmp_path / "no2x.tif", (1, 4))
    rec, h5 = _extract(slide, tmp_path / "clam", "clam")
    encoded = rec.pixels()
    with h5py.File(h5, "r") as f:
        coords, attrs = f["coords"][:], dict(f["coords"].attrs)
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == 448
    trident = _trident_attrs(tmp_path, slide)
    assert trident["patch_size"] == 224 and trident["patch_size_level0"] == 448
    wsi = openslide.OpenSlide(str(slide))
    for i in (0, len(coords) - 1):
        read = Image.fromarray(_clam_read(wsi, attrs, coords[i]))  # CLAM's encoder transform then resizes
        np.testing.assert_array_equal(np.asarray(read.resize((224, 224), Image.Resampling.BILINEAR)), encoded[i])
        np.testing.assert_array_equal(_trident_read(wsi, trident, coords[i]), encoded[i])
    wsi.close()


def _trident_attrs(tmp_path: Path, slide: Path) -> dict:
    _, h5 = _extract(slide, tmp_path / "trident", "trident")
    with h5py.File(h5, "r") as f:
        return dict(f["coords"].attrs)
