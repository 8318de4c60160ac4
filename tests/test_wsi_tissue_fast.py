"""The fast parts of tissue detection equal the plain operations they replace.

``detect_tissue`` computes saturation by a (max, min) lookup table, Otsu's histogram by
counting bin indices, and the holes to fill by one labelling of the background. Each is
checked here against the operation it stands in for: the float32 formula, ``np.histogram``,
and ``scipy.ndimage.binary_fill_holes``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from histofm.data import sample_path
from histofm.wsi import open_slide
from histofm.wsi.tissue import _saturation_table, detect_tissue, otsu_threshold


def _otsu_reference(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    if hist.sum() == 0:
        return 0.0
    p = hist / hist.sum()
    w0, m = np.cumsum(p), np.cumsum(p * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m[-1] * w0 - m) ** 2 / (w0 * (1.0 - w0))
    between[~np.isfinite(between)] = 0.0
    return float(edges[int(np.argmax(between)) + 1])


def test_otsu_counts_bins_as_np_histogram() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.random(int(rng.integers(1, 3000))).astype(np.float32)
        v[rng.random(v.shape) < 0.1] = rng.choice([0.0, 1.0, 0.5, 0.25, -0.1, 1.2, np.nan])
        assert otsu_threshold(v) == _otsu_reference(v)
    assert otsu_threshold(np.array([np.nan, 2.0])) == 0.0


def test_saturation_table_is_the_float32_formula() -> None:
    hi, lo = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    b, d = hi.astype(np.float32) / 255.0, lo.astype(np.float32) / 255.0
    assert np.array_equal(_saturation_table(), (b - d) / np.maximum(b, 1e-6))


def test_background_labelling_finds_the_holes_fill_holes_fills() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = ndimage.binary_opening(rng.random((int(rng.integers(3, 50)), int(rng.integers(3, 50)))) < 0.55)
        lab, _ = ndimage.label(~m)
        outside = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        assert np.array_equal((lab > 0) & ~np.isin(lab, outside), ndimage.binary_fill_holes(m) & ~m)


def test_small_holes_inside_tissue_are_filled_and_large_ones_kept() -> None:
    with open_slide(sample_path("cmu_small_region")) as s:
        few = detect_tissue(s, max_hole_um2=0.0)  # fill nothing
        all_ = detect_tissue(s, max_hole_um2=1e12)  # fill every hole
    filled = ndimage.binary_fill_holes(few.mask)
    assert np.array_equal(all_.mask, filled) and all_.mask.sum() >= few.mask.sum()
