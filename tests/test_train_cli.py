"""``histofm pretrain``: a short run on bundled tiles, resume, YAML config, CLIP from a caption CSV, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import histofm
from histofm.cli import main
from histofm.train import read_log
from ssl_check import one_thread

TINY = ["--set", "backbone.depth=1", "--set", "backbone.patch_size=8", "--set", "backbone.embed_dim=32",
        "--set", "backbone.num_heads=2"]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_pretrain_bundled_then_resume(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    base = ["pretrain", "--method", "simclr", "--model", "vit_tiny_patch16_224", "--data", "bundled", "--img-size", "32",
            "--batch-size", "8", "--out", str(out), "--no-progress", "--set", "proj_hidden_dim=32",
            "--set", "view.hed_p=0.5", "--set", "monitor_every=2", "--set", "ckpt_every=2", "--set", "log_every=1", *TINY]
    assert main([*base, "--steps", "5", "--set", "stop_after=3"]) == 0
    assert "final loss" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [0, 1, 2]
    assert main([*base, "--steps", "5", "--resume"]) == 0
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [0, 1, 2, 3, 4]
    meta = json.loads((out / "backbone.json").read_text())
    assert meta == {**meta, "arch": "vit_tiny_patch16_224", "steps": 5, "finished": True}
    model = histofm.create_model(meta["arch"], checkpoint_path=out / "backbone.safetensors", **meta["overrides"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["batch_size"] == 8 and cfg["resume"] is True


def test_pretrain_from_yaml_and_clip_captions(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,tile number {i}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "run.yaml").write_text(
        "method: clip\nmodel: vit_tiny_patch16_224\nimg_size: 32\n"
        f"data: {tmp_path}\nout: {tmp_path / 'out'}\n"
        "train: {steps: 2, batch_size: 4, progress: false, monitor_every: 1, log_every: 1}\n"
        "method_args: {embed_dim: 16, text_width: 32, text_layers: 1, text_heads: 2, context_length: 24}\n"
        "backbone: {depth: 1, patch_size: 8, embed_dim: 32, num_heads: 2}\n"
    )
    assert main(["pretrain", "--config", str(tmp_path / "run.yaml")]) == 0
    log = read_log(tmp_path / "out" / "log.jsonl")
    assert len(log) == 2 and "logit_scale" in log[0] and "rankme" in log[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "byol"], "Unknown method"),
        (["--set", "temprature=0.1"], "--set temprature=0.1: Unknown option(s) temprature"),
        (["--set", "lr=fast"], "--set lr=fast: lr expects a float"),
        (["--steps", "0"], "--steps 0: steps must be >= 1"),
        (["--set", "log_every=x"], "--set log_every=x: log_every expects an integer"),
        (["--set", "warmup_steps=5"], "--set warmup_steps=5: warmup_steps must be at most steps=1"),
        (["--data", "/nonexistent/folder"], "does not exist"),
        (["--model", "vit_tiny_patch16_225"], "Unknown model"),
        (["--set", "nonsense"], "KEY=VALUE"),
    ],
)
def test_pretrain_bad_input_exits_2(tmp_path, capsys, extra, message) -> None:
    args = {"--method": "simclr", "--model": "vit_tiny_patch16_224", "--data": "bundled", "--out": str(tmp_path)}
    flat = []
    for k, v in args.items():
        if k not in extra:
            flat += [k, v]
    assert main(["pretrain", *flat, "--steps", "1", "--img-size", "32", *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one sentence, no traceback
    assert not (tmp_path / "checkpoint.pt").exists()
