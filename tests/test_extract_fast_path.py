"""Extraction's fast reading path (stored-tile decoding, reader threads, row bands, selection ahead)
gives the same features as the plain path (OpenSlide, DataLoader worker processes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from histofm.data import sample_path
from histofm.wsi import stored
from histofm.wsi.ahead import SelectionAhead
from histofm.wsi.dataset import raster_batches
from histofm.wsi.features import ExtractConfig, extract_features, read_features

pytest.importorskip("openslide")
pytest.importorskip("imagecodecs")


class _Colour(nn.Module):
    """Per-channel mean and standard deviation of each tile: sensitive to every pixel, no weights."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # (B, 6)


@pytest.mark.parametrize(("n", "batch", "workers"), [(28, 4, 3), (10, 4, 2), (3, 4, 2), (20, 4, 1), (0, 4, 2)])
def test_raster_batches_give_each_worker_one_band(n: int, batch: int, workers: int) -> None:
    order = raster_batches(n, batch, workers)
    assert sorted(i for b in order for i in b) == list(range(n))  # every tile once
    assert all(0 < len(b) <= batch for b in order)
    if workers > 1:
        for w in range(workers):  # what DataLoader hands worker w: consecutive tiles, top to bottom
            mine = [i for b in order[w::workers] for i in b]
            assert mine == list(range(mine[0], mine[0] + len(mine))) if mine else True


def _extract(slides: list[Path], out: Path, **kwargs: object) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    cfg = ExtractConfig(batch_size=16, num_workers=2, device="cpu", min_tissue=0.3, **kwargs)
    report = extract_features(slides, _Colour(), out, config=cfg, progress=False)
    assert not report.failures, report.failures[0].error
    return {r.slide: read_features(r.output) for r in report.results}


def test_fast_path_equals_openslide_with_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two slides in one run (the second selected while the first is read) equal OpenSlide + processes."""
    slides = []
    for name in ("a.svs", "b.svs"):
        slides.append(tmp_path / name)
        shutil.copyfile(sample_path("cmu_small_region"), slides[-1])
    started: list[str] = []
    original = SelectionAhead.start
    monkeypatch.setattr(SelectionAhead, "start", lambda self, path: (started.append(path.name), original(self, path)))
    fast = _extract(slides, tmp_path / "fast")
    assert started == ["b.svs"]  # b's tiles were selected while a was read
    with monkeypatch.context() as m:  # no stored-tile decoding anywhere: OpenSlide reads every pixel
        m.setattr(stored, "open_stored_tiles", lambda *a, **k: None)
        m.setattr("histofm.wsi.readers.open_stored_tiles", lambda *a, **k: None)
        plain = _extract(slides[:1], tmp_path / "plain", reader_threads=False)
    feats, coords, attrs = fast["a.svs"]
    p_feats, p_coords, p_attrs = plain["a.svs"]
    assert attrs["tile_decoder"] == "stored-tiles" and p_attrs["tile_decoder"] == "openslide"
    assert len(coords) > 40
    np.testing.assert_array_equal(coords, p_coords)
    np.testing.assert_array_equal(feats, p_feats)  # same pixels, same order, same numbers
    np.testing.assert_array_equal(fast["b.svs"][0], feats)  # the slide selected ahead: identical
    # Rows really differ from each other (a path that repeated one tile would not pass the equalities).
    assert len(np.unique(feats.round(4), axis=0)) > len(feats) // 2
