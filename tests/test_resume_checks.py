"""What a resume must keep (objective, data, image size, label files), skipped-step counts, CLI warnings, and
the parent of ``features_<model>/`` given to ``mil train``: each refused or reported in one sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from histofm.cli import main
from histofm.errors import HistofmError
from histofm.train import TrainConfig, fit
from histofm.utils.objective import Objective
from ssl_check import one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


class Line(Objective):
    """Fits ``y = 2x``; with ``nan_at`` its loss is NaN at those steps (the engine must skip them)."""

    def __init__(self, nan_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.net, self.nan_at, self.step = nn.Linear(1, 1), set(nan_at), 0

    def forward(self, batch):
        x, y = batch
        loss = F.mse_loss(self.net(x[:, None])[:, 0], y)
        return {"loss": loss * float("nan") if self.step in self.nan_at else loss}

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.step = step + 1

    def exported_module(self) -> nn.Module:
        return self.net


class OtherLine(Line):
    """The same parameters under another objective's name."""


def _fit(obj: Objective, out: Path, steps: int, resume: bool = False, **kw):
    x = torch.linspace(-1, 1, 8)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=0.1, out_dir=str(out), resume=resume, progress=False,
                      tensorboard=False, monitor_every=0, log_every=1)
    return fit(obj, [(x[i], 2 * x[i]) for i in range(8)], cfg, **kw)


@pytest.mark.filterwarnings("ignore:resuming a run planned")
def test_engine_resume_names_both_objectives_and_run_values(tmp_path: Path) -> None:
    _fit(Line(), tmp_path, 2, run_info={"--data": "/a (8 samples)"})
    with pytest.raises(HistofmError, match=r"made by Line but this run trains OtherLine"):
        _fit(OtherLine(), tmp_path, 4, resume=True, run_info={"--data": "/a (8 samples)"})
    with pytest.raises(HistofmError, match=r"made with --data /a \(8 samples\) but this run has --data /b \(9 samples\); "
                                           r"use the same --data"):
        _fit(Line(), tmp_path, 4, resume=True, run_info={"--data": "/b (9 samples)"})
    assert len(_fit(Line(), tmp_path, 4, resume=True, run_info={"--data": "/a (8 samples)"})) == 4


@pytest.mark.filterwarnings("ignore:non-finite loss")
def test_skipped_steps_are_counted_in_the_export(tmp_path: Path) -> None:
    history = _fit(Line(nan_at=(1, 3)), tmp_path, 6)
    assert [h["skipped"] for h in history] == [False, True, False, True, False, False]
    assert json.loads((tmp_path / "model.json").read_text())["skipped_steps"] == 2
    assert history[-1]["loss"] < history[0]["loss"]  # the other steps still learnt


TINY = ["--set", "backbone.depth=1", "--set", "backbone.patch_size=8", "--set", "backbone.embed_dim=32",
        "--set", "backbone.num_heads=2", "--set", "proj_hidden_dim=32", "--set", "monitor_every=0"]


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_pretrain_resume_refuses_other_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _images(tmp_path / "a", 8), _images(tmp_path / "b", 9)
    base = ["pretrain", "--method", "simclr", "--model", "vit_tiny_patch16_224", "--img-size", "32",
            "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress", *TINY]
    assert main([*base, "--data", str(a), "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*base, "--data", str(b), "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"made with --data {a.resolve()} (8 samples) but this run has --data {b.resolve()} (9 samples)" in err, err
    assert err.count("\n") == 1
    assert main([*base, "--data", str(a), "--steps", "4", "--resume", "--img-size", "16"]) == 2
    assert "--img-size 32 but this run has --img-size 16" in capsys.readouterr().err


def test_semi_resume_refuses_other_img_size_and_test_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_semi import _write_folder

    _write_folder(tmp_path)
    base = ["semi", "--method", "fixmatch", "--data", str(tmp_path / "tiles"), "--labels", str(tmp_path / "labels.csv"),
            "--width", "4", "--batch-size", "4", "--mu", "2", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "run")]
    assert main([*base, "--steps", "2", "--img-size", "16"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_steps"] == 0
    capsys.readouterr()
    assert main([*base, "--steps", "4", "--img-size", "24", "--resume"]) == 2
    assert "--img-size 16 but this run has --img-size 24; use the same --img-size" in capsys.readouterr().err
    assert main([*base, "--steps", "4", "--img-size", "16", "--resume", "--test-labels", str(tmp_path / "test.csv")]) == 2
    err = capsys.readouterr().err
    assert f"--test-labels (not set) but this run has --test-labels {(tmp_path / 'test.csv').resolve()}" in err, err


WARNING_CLI = """
import sys, warnings
import histofm.commands.models as models
def run(args):
    warnings.warn("the check warned", UserWarning, stacklevel=1)
    return 0
models.run = run
from histofm.cli import main
sys.exit(main(["models"]))
"""


def test_cli_warnings_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-c", WARNING_CLI], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "histofm: warning: the check warned\n"  # no file name, no Python source line


def test_mil_features_parent_folder_names_the_folder_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inner = tmp_path / "feats" / "features_uni"
    inner.mkdir(parents=True)
    (inner / "S01.h5").write_bytes(b"")  # never read: the folder is refused first
    (tmp_path / "labels.csv").write_text("slide_id,label\nS01,a\nS02,b\n")
    code = main(["mil", "train", "--features", str(tmp_path / "feats"), "--labels", str(tmp_path / "labels.csv"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"only the folder(s) features_uni; pass the folder of one encoder, e.g. --features {inner}" in err
    code = main(["mil", "predict", "--run", str(tmp_path / "run"), "--features", str(tmp_path / "feats"),
                 "--out", str(tmp_path / "preds")])
    assert code == 2 and "e.g. --features" in capsys.readouterr().err
