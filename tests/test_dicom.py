"""DICOM reading on the bundled real files: units, polarity, channels, volumes, bad input."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from histofm import HistofmError
from histofm.data import SAMPLES_DIR
from histofm.medical import CT_WINDOWS, apply_window, read_dicom, to_rgb_slices

DICOM_DIR = SAMPLES_DIR / "dicom"
EXPECTED = {
    "RG1_J2KI.dcm": ("CR", (1, 1955, 1841)),
    "RG3_J2KI.dcm": ("CR", (1, 1760, 1760)),
    "693_J2KR.dcm": ("CT", (1, 512, 512)),
    "eCT_Supplemental.dcm": ("CT", (2, 512, 512)),
    "MR2_J2KI.dcm": ("MR", (1, 1024, 1024)),
    "emri_small.dcm": ("MR", (10, 64, 64)),
    "US1_J2KI.dcm": ("US", (1, 480, 640, 3)),
    "OBXXXX1A_rle.dcm": ("US", (1, 600, 800, 3)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_bundled_file_reads_to_rgb_slices(name: str) -> None:
    modality, shape = EXPECTED[name]
    img = read_dicom(DICOM_DIR / name)
    assert img.modality == modality
    assert img.array.shape == shape
    slices = to_rgb_slices(img)
    assert len(slices) == shape[0]
    for s in slices:
        assert s.dtype == np.uint8 and s.ndim == 3 and s.shape[-1] == 3
        assert s.std() > 5  # a real picture, not a constant


def test_ct_is_in_hounsfield_units() -> None:
    ds = pydicom.dcmread(DICOM_DIR / "693_J2KR.dcm")
    stored = ds.pixel_array.astype(np.float64)
    img = read_dicom(DICOM_DIR / "693_J2KR.dcm")
    expected = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(img.array[0], expected, rtol=0, atol=1e-3)
    # Air around the head is about -1000 HU; the median of the slice centre is soft tissue.
    corner = img.array[0, :40, :40]
    assert np.median(corner) < -900
    assert -100 < np.median(img.array[0, 230:280, 230:280]) < 150


def test_enhanced_ct_takes_its_rescale_from_the_functional_groups() -> None:
    """Enhanced CT keeps slope and intercept inside (per-frame or shared) functional groups."""
    ds = pydicom.dcmread(DICOM_DIR / "eCT_Supplemental.dcm")
    assert "RescaleIntercept" not in ds  # nothing at the top level: a plain modality LUT would miss it
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    img = read_dicom(DICOM_DIR / "eCT_Supplemental.dcm")
    expected = ds.pixel_array.astype(np.float64) * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
    np.testing.assert_allclose(img.array, expected, rtol=0, atol=1e-3)
    assert img.array.min() < -900  # air is about -1000 HU (stored 0 with intercept -1024)


def test_window_math() -> None:
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    out = apply_window(hu, *CT_WINDOWS["soft_tissue"])  # [-160, 240]
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(HistofmError, match="positive"):
        apply_window(hu, 0, 0)


def test_monochrome1_is_inverted_so_bone_is_bright() -> None:
    ds = pydicom.dcmread(DICOM_DIR / "RG1_J2KI.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float32)
    img = read_dicom(DICOM_DIR / "RG1_J2KI.dcm")
    spine, outside = (slice(900, 1000), slice(900, 940)), (slice(50, 100), slice(50, 100))
    assert raw[spine].mean() < raw[outside].mean()  # stored: dense = low
    assert img.array[0][spine].mean() > img.array[0][outside].mean()  # returned: dense = high
    rgb = to_rgb_slices(img)[0]
    assert rgb[spine].mean() > rgb[outside].mean()


def test_named_ct_window_and_unknown_window() -> None:
    img = read_dicom(DICOM_DIR / "693_J2KR.dcm")
    bone = to_rgb_slices(img, "bone")[0]
    soft = to_rgb_slices(img, "soft_tissue")[0]
    assert (soft == 255).mean() > (bone == 255).mean()  # a narrow soft-tissue window saturates bone
    with pytest.raises(HistofmError, match="Unknown window"):
        to_rgb_slices(img, "liver-ish")


def test_bad_inputs(tmp_path) -> None:
    with pytest.raises(HistofmError, match="does not exist"):
        read_dicom(tmp_path / "missing.dcm")
    (tmp_path / "notes.dcm").write_text("this is not a dicom file\n" * 20)
    with pytest.raises(HistofmError, match="not a DICOM file"):
        read_dicom(tmp_path / "notes.dcm")
    data = (DICOM_DIR / "emri_small.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 3])
    with pytest.raises(HistofmError):
        read_dicom(tmp_path / "cut.dcm")
