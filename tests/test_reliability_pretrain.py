"""Kill -9 during `histofm pretrain`, then rerun with --resume: no partial files, same outputs as one clean run.

One real ``histofm pretrain`` subprocess after another is SIGKILLed at five points (during start-up,
right after the first checkpoint, half-way through writing a checkpoint, in the middle of the run,
half-way through writing the final checkpoint), each rerun resuming what the previous kill left.
After every kill the test checks that everything readable is complete; then a last rerun resumes
to the end and is compared with an uninterrupted reference run: the exported backbone bit for
bit, the final checkpoint's method state and history, and ``log.jsonl`` (one record per step, no
duplicates, no torn lines). All runs use one thread (``OMP_NUM_THREADS=1``) so the
floating-point reductions, and hence the results, are the same in every process.

The kill points after start-up are made exact with a small wrapper around the CLI that stalls the
run at that point and touches a marker; the test kills the process then (a real kill, without timing
luck: a race against the run, which a busy CI machine could let finish before the kill, made the
test fail by chance). "Checkpoint write": on its Nth call, ``torch.save`` writes half of the
checkpoint's bytes into the temporary file, then stalls. "First checkpoint": the run stalls once its
first checkpoint is in place. "Middle": it stalls once the record of step STEPS // 2 is logged.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from histofm.train.checkpoint import load_training_state

STEPS, CKPT_EVERY = 16, 2
ARGS = [
    "pretrain", "--method", "simclr", "--model", "vit_tiny_patch16_224", "--data", "bundled", "--img-size", "32",
    "--batch-size", "8", "--steps", str(STEPS), "--workers", "0", "--no-progress", "--device", "cpu",
    "--set", f"ckpt_every={CKPT_EVERY}", "--set", "log_every=1", "--set", "monitor_every=0",
    "--set", "proj_hidden_dim=32", "--set", "backbone.depth=1", "--set", "backbone.patch_size=8",
    "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2",
    "--set", "backbone.drop_rate=0.1",  # dropout draws from torch's global RNG: a resume must restore it
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMING = ("sec_per_step", "samples_per_sec")  # wall-clock fields of log.jsonl, different in every run

# The CLI, stalled at a kill point: argv = [mode, n, marker, *cli_args]. Modes: "mid-save" (the Nth
# torch.save writes half its bytes, then stalls), "after-checkpoint" (stalls once the Nth checkpoint
# is renamed into place), "after-log" (stalls once the record of step N is in log.jsonl).
STALLING_CLI = """
import io, os, sys, time
import torch
mode, n, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def stall():
    open(marker, "w").close()
    time.sleep(600)
real_save, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if mode == "mid-save" and calls[0] == n:
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        stall()
    return real_save(obj, f, *args, **kwargs)
torch.save = save
import histofm.train.logs as logs
import histofm.train.loop as loop
real_state, states = loop.save_training_state, [0]
def save_training_state(*args, **kwargs):
    real_state(*args, **kwargs)
    states[0] += 1
    if mode == "after-checkpoint" and states[0] == n:
        stall()
loop.save_training_state = save_training_state
real_log = logs.RunLogger.log
def log(self, record):
    real_log(self, record)
    if mode == "after-log" and record.get("step") == n:
        stall()
logs.RunLogger.log = log
from histofm.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _cmd(out: Path, *, resume: bool, stall: tuple[str, int, Path] | None = None) -> list[str]:
    args = [*ARGS, "--out", str(out), *(["--resume"] if resume else [])]
    if stall is None:
        return [sys.executable, "-m", "histofm", *args]
    return [sys.executable, "-c", STALLING_CLI, *map(str, stall), *args]


def _visible(out: Path) -> set[str]:
    return {f.name for f in out.iterdir() if not f.name.startswith(".")}


def _log_lines(out: Path) -> list[str]:
    p = out / "log.jsonl"
    return p.read_text().splitlines(keepends=True) if p.exists() else []


def _outputs(out: Path) -> dict[str, Any]:
    """Everything that must match between runs (and must be complete)."""
    lines = _log_lines(out)
    assert all(line.endswith("\n") for line in lines), "torn line in log.jsonl"
    log = [json.loads(line) for line in lines]
    state = load_training_state(out / "checkpoint.pt")
    Image.open(out / "loss_curve.png").verify()
    return {
        "files": _visible(out),
        "backbone": load_file(out / "backbone.safetensors"),
        "backbone.json": json.loads((out / "backbone.json").read_text()),
        "step": state["step"],
        "method": state["method"],
        "history": state["history"],
        "log": [{k: v for k, v in r.items() if k not in TIMING} for r in log],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("clean") / "run"
    t0 = time.monotonic()
    proc = subprocess.run(_cmd(out, resume=False), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    ref = _outputs(out)
    ref["seconds"] = time.monotonic() - t0
    assert ref["step"] == STEPS and [r["step"] for r in ref["log"]] == list(range(STEPS))
    assert not [f for f in out.iterdir() if f.name.startswith(".")]
    # Every output gets the same, usual permissions (no 0600 file left by a temporary's mkstemp).
    assert len({stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}) == 1
    return ref


# ------------------------------------------------------------------------------------------ kill points
def _checkpoint_step(out: Path) -> int:
    p = out / "checkpoint.pt"
    return int(load_training_state(p)["step"]) if p.exists() else 0  # weights_only=True: a torn file raises


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def _saves(start: int) -> list[int]:
    """The steps of the checkpoints a run started (or resumed) at ``start`` writes, in order."""
    return [d for d in range(start + 1, STEPS) if d % CKPT_EVERY == 0] + [STEPS]


# Kill points, in the order the test visits them (each rerun resumes what the previous kill left):
# name -> (where that run stalls, given the step it starts at: (mode, n) of STALLING_CLI, or None for a
# kill 0.5 s after launch; what must hold at the kill, given out_dir and the checkpoint's mtime at launch)
KILL_POINTS: dict[str, tuple[Callable[[int], tuple[str, int]] | None, Callable[[Path, int], bool]]] = {
    "start-up": (None, lambda out, t0: True),  # after a fixed 0.5 s: still importing
    "first checkpoint": (lambda start: ("after-checkpoint", 1), lambda out, t0: (out / "checkpoint.pt").exists()),
    "mid checkpoint write": (lambda start: ("mid-save", 2), lambda out, t0: True),
    "middle": (  # a checkpoint newer than at launch and the log past half the run
        lambda start: ("after-log", STEPS // 2),
        lambda out, t0: _mtime(out / "checkpoint.pt") != t0 and len(_log_lines(out)) > STEPS // 2,
    ),
    "final checkpoint write": (lambda start: ("mid-save", len(_saves(start))), lambda out, t0: True),
}


def _kill_at(out: Path, marker: Path, point: str, *, resume: bool) -> int | None:
    """Run the CLI, SIGKILL it at ``point``; returns the step whose checkpoint write was stalled, if any."""
    stall_fn, holds = KILL_POINTS[point]
    start = _checkpoint_step(out)
    stall = stall_fn(start) if stall_fn is not None else None
    marker.unlink(missing_ok=True)
    t0 = _mtime(out / "checkpoint.pt")
    cmd = _cmd(out, resume=resume, stall=(*stall, marker) if stall is not None else None)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if stall is None:
            time.sleep(0.5)
        else:  # the run waits at the kill point for as long as this process takes to notice
            deadline = time.monotonic() + 300
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before the kill point {point!r}: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert holds(out, t0), f"the kill point {point!r} was not reached as planned"
    return _saves(start)[stall[1] - 1] if stall is not None and stall[0] == "mid-save" else None


def _check_after_kill(out: Path, point: str, stalled: int | None) -> None:
    """What a kill leaves: complete files under their real names; temporaries only under hidden names."""
    if not out.exists():
        return
    for f in out.iterdir():
        if f.name.startswith("."):  # an atomic_path temporary: `.{name}.{random}.tmp`, never read as output
            assert f.name.endswith(".tmp") and f.name.split(".")[1] in {"checkpoint", "log", "config", "backbone", "loss_curve"}
    step = _checkpoint_step(out)
    lines = _log_lines(out)
    complete = [json.loads(line) for line in lines if line.endswith("\n")]
    assert len(lines) - len(complete) <= 1  # at most the last line is torn (appends are not atomic)
    assert [r["step"] for r in complete] == list(range(len(complete)))
    assert step == STEPS or step % CKPT_EVERY == 0
    assert len(complete) >= step  # the log is written before the checkpoint of the same step
    if point == "start-up":
        assert step == 0 and not lines
    if stalled is not None:
        # Killed half-way through writing the checkpoint of step `stalled`: the previous one is intact
        # (it is what --resume reads), the half-written bytes sit in a hidden temporary.
        assert step == stalled - CKPT_EVERY and len(complete) == stalled
        assert [f for f in out.iterdir() if f.name.startswith(".checkpoint.pt.") and f.stat().st_size > 0]


def test_kills_then_resume_equal_clean_run(reference, tmp_path: Path) -> None:
    """Five SIGKILLs in a row (each rerun resumes the last), then a rerun to the end."""
    out, marker = tmp_path / "run", tmp_path / "stalled"
    kills = []
    for i, point in enumerate(KILL_POINTS):
        stalled = _kill_at(out, marker, point, resume=i > 0)
        _check_after_kill(out, point, stalled)
        kills.append((point, _checkpoint_step(out), len(_log_lines(out))))
    # The log ran ahead of the checkpoint at some kill, so the resume had log records to drop.
    assert any(n_log > step for _, step, n_log in kills), kills
    rerun = subprocess.run(_cmd(out, resume=True), env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")], "temporary files left behind"
    got = _outputs(out)
    assert got["files"] == reference["files"]
    assert got["backbone.json"] == reference["backbone.json"]
    assert got["step"] == STEPS
    assert got["log"] == reference["log"]  # one record per step, no duplicates, same losses
    assert got["history"] == reference["history"]
    assert got["backbone"].keys() == reference["backbone"].keys()
    for name, ref_tensor in reference["backbone"].items():
        assert torch.equal(got["backbone"][name], ref_tensor), name  # bit-identical
    for name, ref_tensor in reference["method"].items():
        assert torch.equal(got["method"][name], ref_tensor), name


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_a_random_moment_then_resume_equals_clean_run(reference, tmp_path: Path, seed: int) -> None:
    """SIGKILL after a seeded random delay within a clean run's length, then resume: the same outputs."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, resume=False), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.5, reference["seconds"]))
    if proc.poll() is None:  # on a fast machine the run may already be over: then there is nothing to kill
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    _check_after_kill(out, "random", None)
    rerun = subprocess.run(_cmd(out, resume=True), env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    got = _outputs(out)
    for key in ("files", "backbone.json", "step", "log", "history"):
        assert got[key] == reference[key], key
    for name, ref_tensor in reference["backbone"].items():
        assert torch.equal(got["backbone"][name], ref_tensor), name
