"""Where OpenSlide cannot be imported, slides are read with tiffslide after one notice per process."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from histofm.data import sample_path
from histofm.errors import HistofmError
from histofm.wsi import open_slide, readers

SLIDE = sample_path("cmu_small_region")


@pytest.fixture
def no_openslide(monkeypatch) -> None:
    """Simulate a platform without OpenSlide: `import openslide` raises ImportError."""
    monkeypatch.setitem(sys.modules, "openslide", None)
    monkeypatch.setattr(readers, "_fallback_noticed", False)


def test_auto_falls_back_to_tiffslide_with_one_notice(no_openslide, capsys) -> None:
    with open_slide(SLIDE) as slide:
        assert slide.backend == "tiffslide"
        tile = np.asarray(slide.read_region((100, 100), 0, (64, 64)))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OpenSlide cannot be imported" in err and "tiffslide instead" in err
    with open_slide(SLIDE) as slide:  # a second slide in the same process: no second notice
        assert slide.backend == "tiffslide"
    assert capsys.readouterr().err == ""
    with open_slide(SLIDE, backend="tiffslide") as ref:  # the same pixels a tiffslide user gets
        np.testing.assert_array_equal(tile, np.asarray(ref.read_region((100, 100), 0, (64, 64))))


def test_asking_for_openslide_explicitly_names_the_fix(no_openslide, capsys) -> None:
    with pytest.raises(HistofmError) as e:
        open_slide(SLIDE, backend="openslide")
    msg = str(e.value)
    assert "OpenSlide backend cannot be imported" in msg and "--backend auto" in msg and "openslide-bin" in msg
    assert capsys.readouterr().err == ""  # an explicit choice is an error, not a notice


def test_an_openslide_only_format_says_that_openslide_is_missing(no_openslide, tmp_path, capsys) -> None:
    fake = tmp_path / "slide.mrxs"
    fake.write_bytes(b"not really a MIRAX slide")
    with pytest.raises(HistofmError, match="OpenSlide itself cannot be imported here"):
        open_slide(fake)


def test_with_openslide_present_auto_uses_it_silently(capsys, monkeypatch) -> None:
    monkeypatch.setattr(readers, "_fallback_noticed", False)
    with open_slide(SLIDE) as slide:
        assert slide.backend == "openslide"
    assert capsys.readouterr().err == ""
