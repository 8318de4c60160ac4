"""A process killed at any instant of extraction's write path: the rerun recovers, always.

The write path of one slide is the slide lock (``wsi/locks.py``), the clean-up of temporaries and
the atomic writes (``utils``), and the per-slide steps and writes of ``wsi/features.py``. A child
process (``fork``) extracts one slide and dies (``os._exit``) at its Nth traced line of that code,
for every N until it finishes. After each death, every visible feature file is complete; the rerun
(in this process) embeds the slide or finds it done, never skips it as "done by another process",
gives the clean run's features, and leaves no lock or temporary file behind. The timing-based
SIGKILL tests of ``test_reliability_extract.py`` land on a few of these instants by chance.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import histofm
from histofm.data import sample_path
from histofm.wsi.features import ExtractConfig, extract_features

SRC = Path(histofm.__file__).parent
# The traced code: the functions of the write path that change files. A death inside a function that only
# reads or computes (temp_name, pid_alive, _resume_state ...) leaves what a death at its call leaves.
TRACED = {
    str(SRC / "wsi" / "locks.py"): {"try_lock", "slide_lock", "_create", "_break"},
    str(SRC / "utils" / "__init__.py"): {"atomic_path", "remove_stale_temps", "make_dirs"},
    str(SRC / "wsi" / "features.py"): {"_one_slide", "_locked_slide", "_write"},
}


class TinyEncoder(nn.Module):
    """(B, 3, 64, 64) -> (B, 8): the write path is under test, not the encoder (a ViT would cost seconds here)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 16, stride=16)
        self.num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    root = tmp_path_factory.mktemp("killed_anywhere")
    slide = root / "slide.png"  # 128 x 128 px of real tissue at 0.5 um/px: 4 tiles of 64 px
    Image.open(sample_path("hgsc_nest")).convert("RGB").crop((300, 300, 428, 428)).save(slide)
    return slide, TinyEncoder().eval()


def _cfg(layout: str) -> ExtractConfig:
    return ExtractConfig(target_mpp=0.5, tile_size=64, min_tissue=0.0, batch_size=4, num_workers=0,
                         device="cpu", layout=layout)


def _extract(slide: Path, model: object, out: Path, layout: str):  # noqa: ANN202
    return extract_features([slide], model, out, config=_cfg(layout), mpp=0.5, progress=False)


_seen, _die_at = [0], [0]


def _traced(frame, event, arg):  # noqa: ANN001, ANN202
    """Global trace function: line events only inside the traced functions (everything else runs untraced).

    Each line counts once per call: a death in the 2nd to 30th round of a loop (the HDF5 attributes,
    the folder's files) leaves what a death in its 1st round leaves.
    """
    code = frame.f_code
    if code.co_name not in TRACED.get(code.co_filename, ()):
        return None
    lines: set[int] = set()

    def count(frame, event, arg):  # noqa: ANN001, ANN202
        if event == "line" and frame.f_lineno not in lines:
            lines.add(frame.f_lineno)
            _seen[0] += 1
            if _seen[0] == _die_at[0]:
                os._exit(9)
        return count

    return count


def _killed_at_line(slide: Path, model: object, out: Path, layout: str, n: int) -> bool:
    """Fork; the child extracts and dies at its ``n``-th traced line. True when it died, False when it finished."""
    pid = os.fork()
    if pid == 0:
        try:
            _seen[0], _die_at[0] = 0, n
            sys.settrace(_traced)
            _extract(slide, model, out, layout)
            sys.settrace(None)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 9


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_kill_at_any_traced_line_of_the_write_path_is_recovered(world, tmp_path: Path) -> None:
    slide, model = world
    layout = "clam"  # the trident path and more: the .pt before the .h5, each in a subfolder with its lock
    clean = _extract(slide, model, tmp_path / "clean", layout)
    assert [r.status for r in clean.results] == ["done"]
    expected = _files(tmp_path / "clean")
    with h5py.File(clean.results[0].output) as f:
        ref = f["features"][:]
    for n in range(1, 2000):
        out = tmp_path / f"n{n}"
        if not _killed_at_line(slide, model, out, layout, n):
            break  # the child finished before line n: every instant was tried
        for name in _files(out):  # what the kill left: complete files under their real names only
            if name.endswith(".h5") and not Path(name).name.startswith("."):
                with h5py.File(out / name) as f:
                    assert len(f["features"]) == len(f["coords"]) == len(ref), (n, name)
        report = _extract(slide, model, out, layout)
        result = report.results[0]
        assert result.status in ("done", "skipped") and result.note is None, (n, result)
        with h5py.File(result.output) as f:
            np.testing.assert_array_equal(f["features"][:], ref)
        assert _files(out) == expected, f"killed at traced line {n}: {_files(out)}"
    else:
        pytest.fail("the extraction never finished within 2000 traced lines")
    assert n > 50  # the child really died at many instants
