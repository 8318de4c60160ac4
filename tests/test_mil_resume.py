"""Kill -9 during `histofm mil train`, then rerun: it resumes per fold and ends bit-identical to a clean run.

Training runs through the engine (:func:`histofm.train.fit`), whose checkpoint of the fold
(``fold_K/checkpoint.pt``) is what a rerun resumes from. Kill points are exact, not timing luck: a
small wrapper around the CLI makes the Nth ``torch.save`` (one per epoch: the engine's checkpoint)
write half its bytes, touch a marker and stall; the test
SIGKILLs the process then. N is drawn from a seeded generator over the run's epochs, once inside the
first fold and once inside the second (after the first fold's model is final). Between kills a rerun
with other settings is refused without touching the folder. The last rerun (``--resume``) finishes;
fold models, metrics, predictions and the log must equal an uninterrupted run's byte for byte.
Last, a rerun with new settings into the finished folder is killed: ``config.json`` stays the old
one, and the folder is no longer a finished run (the new weights are never paired with it).
All runs use one thread, so floating-point reductions are the same in each.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from histofm.cli import main
from mil_toy import make_cohort

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
EPOCHS = 6
STALLING_CLI = """
import io, os, sys, time
import torch
stall_at, marker = int(sys.argv[1]), sys.argv[2]
real_save, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == stall_at:
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
        open(marker, "w").close()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from histofm.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _args(feats: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["mil", "train", "--features", str(feats), "--labels", str(labels), "--folds", "2",
            "--epochs", str(EPOCHS), "--batch-size", "2", "--max-tiles", "6", "--lr", "5e-3",
            "--set", "hidden_dim=8", "--set", "attn_dim=4", "--set", "dropout=0.25",  # dropout: global RNG
            "--set", "val_fraction=0.34", "--set", "patience=3", "--set", "n_boot=20",
            "--device", "cpu", "--out", str(out), *extra]


def _outputs(out: Path) -> dict[str, bytes]:
    names = ["fold_0.safetensors", "fold_1.safetensors", "metrics.json", "predictions.csv", "log.jsonl"]
    return {n: (out / n).read_bytes() for n in names}


def _kill_at_save(args: list[str], stall_at: int, marker: Path) -> None:
    marker.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", STALLING_CLI, str(stall_at), str(marker), *args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"ended before save {stall_at}: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def test_kill_and_resume_is_bit_identical(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    feats, labels = make_cohort(tmp_path / "data")
    ref = tmp_path / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children (OMP_NUM_THREADS=1); in-process saves a start-up
    try:
        assert main(_args(feats, labels, ref)) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    expected = _outputs(ref)
    log = [json.loads(line) for line in expected["log.jsonl"].decode().splitlines()]
    epochs = [sum(r["fold"] == k for r in log) for k in (0, 1)]  # one torch.save per epoch
    assert all(e >= 2 for e in epochs)

    rng = random.Random(16)
    out, marker = tmp_path / "run", tmp_path / "marker"
    first = rng.randint(2, epochs[0])  # inside fold 0
    _kill_at_save(_args(feats, labels, out), first, marker)
    names = {f.name for f in out.iterdir()}
    assert "progress.json" in names and "config.json" not in names and "run.json" not in names
    fold0 = {f.name for f in (out / "fold_0").iterdir()}
    assert "checkpoint.pt" in fold0 and not (out / "fold_0.safetensors").exists()
    assert [n for n in fold0 if n.startswith(".checkpoint.pt.") and n.endswith(".tmp")]  # the torn write

    before = _snapshot(out)  # other settings: refused, nothing touched
    assert main(_args(feats, labels, out, "--lr", "1e-3")) == 2
    assert "unfinished `mil train` run with other settings" in capsys.readouterr().err
    assert _snapshot(out) == before

    remaining0 = epochs[0] - (first - 1)  # fold 0 resumes after its last complete state
    second = remaining0 + rng.randint(1, epochs[1])  # inside fold 1
    _kill_at_save(_args(feats, labels, out), second, marker)  # no --resume: same settings resume by themselves
    done = json.loads((out / "progress.json").read_text())["folds_done"]
    assert [d["fold"] for d in done] == [0] and (out / "fold_0.safetensors").exists()
    assert not (out / "config.json").exists()

    proc = subprocess.run([sys.executable, "-m", "histofm", *_args(feats, labels, out, "--resume")], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert _outputs(out) == expected
    assert not [f.name for f in out.rglob("*") if f.name.startswith(".") or f.name == "checkpoint.pt"]
    assert not (out / "progress.json").exists()

    # New settings into the finished folder: refused, nothing touched (it would replace the run silently).
    before = _snapshot(out)
    assert main(_args(feats, labels, out, "--lr", "1e-3")) == 2
    assert "finished `mil train` run with other settings" in capsys.readouterr().err
    assert _snapshot(out) == before
    # With --overwrite, killed: old config.json, no finished run.
    old_config = (out / "config.json").read_bytes()
    _kill_at_save(_args(feats, labels, out, "--lr", "1e-3", "--overwrite"), 1, marker)
    assert (out / "config.json").read_bytes() == old_config and not (out / "run.json").exists()
    assert main(["mil", "predict", "--run", str(out), "--features", str(feats), "--out", str(tmp_path / "p")]) == 2
    assert "no finished run" in capsys.readouterr().err
