"""Bad input to the stain API and its CLI surfaces: one sentence, exit 2, never a silent wrong result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histofm.cli import main
from histofm.data import sample_path
from histofm.data.datasets import _load_sample
from histofm.data.stain import make_stain_transform, normalizer, parse_stain_shifts
from histofm.errors import HistofmError

NAMES = ("macenko", "reinhard", "vahadane")


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    return np.ascontiguousarray(_load_sample("hgsc_stroma")[400:464, 400:464])  # (64, 64, 3) real H&E


def _grey(size: int = 32) -> np.ndarray:
    ramp = np.linspace(40, 220, size).astype(np.uint8)
    return np.repeat(np.repeat(ramp[None, :, None], size, 0), 3, 2)  # (size, size, 3), R = G = B


SINGLE_COLOUR = {
    "grey": _grey(),
    "black": np.zeros((32, 32, 3), np.uint8),
    "pink": np.full((32, 32, 3), (200, 120, 180), np.uint8),
}


@pytest.mark.parametrize("name", NAMES)
def test_targets_without_two_stains_are_refused(name: str) -> None:
    for image in SINGLE_COLOUR.values():
        with pytest.raises(HistofmError, match="single colour.*--stain-target"):
            normalizer(name).fit(image)
    with pytest.raises(HistofmError, match="too little stained tissue"):
        normalizer(name).fit(np.full((32, 32, 3), 255, np.uint8))
    with pytest.raises(HistofmError, match="at least one pixel"):
        normalizer(name).fit(np.zeros((0, 0, 3), np.uint8))


@pytest.mark.parametrize("name", NAMES)
def test_images_without_two_stains_pass_through(name: str, tissue: np.ndarray) -> None:
    norm = normalizer(name).fit(tissue)
    batch = np.stack([*SINGLE_COLOUR.values(), np.full((32, 32, 3), 250, np.uint8)])  # (4, 32, 32, 3)
    np.testing.assert_array_equal(norm.transform(batch), batch)  # Reinhard turned glass into the target's colour
    nest = np.ascontiguousarray(_load_sample("hgsc_nest")[200:264, 300:364])
    assert np.abs(norm.transform(nest).astype(int) - nest).mean() > 3  # real tissue is still normalised
    empty = np.zeros((0, 8, 8, 3), np.uint8)
    assert norm.transform(empty).shape == empty.shape
    with pytest.raises(HistofmError, match="at least one pixel"):
        norm.transform(np.zeros((4, 0, 3), np.uint8))


def test_normalizer_arguments() -> None:
    with pytest.raises(HistofmError, match="Unknown stain normaliser"):
        normalizer(None)  # type: ignore[arg-type]
    with pytest.raises(HistofmError, match="no setting foo; it takes io, alpha, beta, min_pixels"):
        normalizer("macenko", foo=1)
    assert normalizer("reinhard", beta=0.2).beta == 0.2


def test_stain_target_files(tmp_path: Path, tissue: np.ndarray) -> None:
    with pytest.raises(HistofmError, match="is a folder"):
        make_stain_transform("macenko", tmp_path)
    Image.fromarray(_grey()).save(tmp_path / "grey.png")
    with pytest.raises(HistofmError, match="single colour"):
        make_stain_transform("reinhard", tmp_path / "grey.png")
    # The fitted target is cached per file; rewriting the file refits it.
    path = tmp_path / "target.png"
    Image.fromarray(tissue).save(path)
    first = make_stain_transform("macenko", path).norm.target
    Image.fromarray(np.ascontiguousarray(_load_sample("hgsc_nest")[200:264, 300:364])).save(path)
    import os

    os.utime(path, ns=(1, 1))  # a new modification time even on coarse-clock file systems
    second = make_stain_transform("macenko", path).norm.target
    assert not np.allclose(first["he"].numpy(), second["he"].numpy())


def test_parse_stain_shifts() -> None:
    assert parse_stain_shifts("none") == [] and parse_stain_shifts(" NONE ") == []
    assert parse_stain_shifts("hed-scale, hed-bias,hed-scale") == ["hed-scale", "hed-bias"]
    for text, message in ((",", "names no shift"), ("", "names no shift"), ("none,hed-scale", "stands alone"),
                          ("hed", "Unknown stain shift")):
        with pytest.raises(HistofmError, match=message):
            parse_stain_shifts(text)


def test_cli_refuses_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "nuclei", "--model", "vit_tiny_patch8_224", "--random-init"]
    assert main([*base, "--stain-shift", ","]) == 2
    assert "names no shift" in capsys.readouterr().err
    Image.fromarray(_grey()).save(tmp_path / "grey.png")
    out = tmp_path / "out"
    code = main(["extract", str(sample_path("cmu_small_region")), "--model", "vit_tiny_patch16_224", "--random-init",
                 "--out", str(out), "--stain-norm", "vahadane", "--stain-target", str(tmp_path / "grey.png")])
    err = capsys.readouterr().err
    assert code == 2 and "single colour" in err and err.count("\n") == 1, err
    assert not out.exists()  # refused before any work


def test_stain_normalize_refuses_floats_outside_0_1(tissue: np.ndarray) -> None:
    import torch

    from histofm.data.stain import StainNormalize

    tf = StainNormalize(normalizer("macenko").fit(tissue))
    chw = torch.from_numpy(tissue.copy()).permute(2, 0, 1)  # (3, 64, 64) uint8
    ok = tf(chw.float() / 255)
    assert ok.dtype == torch.float32 and 0 <= float(ok.min()) and float(ok.max()) <= 1
    # 0-255 floats became white (so passed through as all ones) and normalised inputs were clipped: both silent.
    for bad, message in ((chw.float(), "divide 0-255 floats by 255"), (chw.float() / 255 - 0.5, "put it before Normalize"),
                         (chw.int(), "dtype torch.int32")):
        with pytest.raises(HistofmError, match=message):
            tf(bad)


def test_hed_jitter_refuses_what_it_would_silently_clip() -> None:
    import torch

    from histofm.data.stain import HEDJitter

    jitter = HEDJitter(0.05, 0.01)
    assert jitter(torch.rand(2, 3, 8, 8)).shape == (2, 3, 8, 8)
    for bad, message in ((torch.rand(3, 8, 8) * 255, "divide 0-255 floats by 255"),
                         (torch.rand(3, 8, 8) - 0.5, "before Normalize"), (torch.rand(8, 8, 3), r"got \(8, 8, 3\)"),
                         (np.zeros((8, 8, 3), np.uint8), "got ndarray")):
        with pytest.raises(HistofmError, match=message):
            jitter(bad)


def test_large_target_images_are_strided_to_4096_px(tmp_path: Path, tissue: np.ndarray) -> None:
    from histofm.data.stain import read_target

    wide = np.tile(tissue[:8], (1, 65, 1))  # (8, 4160, 3): one side over 4,096 px
    Image.fromarray(wide).save(tmp_path / "wide.png")
    got = read_target(tmp_path / "wide.png")
    np.testing.assert_array_equal(got, wide[::2, ::2])  # real pixels, no resampling


def test_stain_shift_errors_speak_of_the_shift() -> None:
    from histofm.data.stain import apply_stain_shift

    with pytest.raises(HistofmError, match=r"^A stain shift takes uint8 RGB images, got dtype float64; convert with "
                                           r"\(x \* 255\)\.round\(\)\.astype\('uint8'\)\.$"):
        apply_stain_shift(np.zeros((8, 8, 3)), "hed-scale")
