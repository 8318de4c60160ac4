"""A training run killed at any instant of the engine's write path: ``resume`` ends as the clean run ends.

The engine's write path is the checkpoint (``save_training_state`` through ``atomic_path``), the
log (``RunLogger``: truncated to the checkpoint's step on resume, then one line appended per
step), the exported module (``export_backbone``: ``.safetensors`` then ``.json``), the loss curve
and the clean-up of temporaries. A child process (``fork``) trains and dies (``os._exit``) at the
Nth entry to or exit from one of those functions, for every N until it finishes; after each death every file under its
real name is complete, and a resumed run (in this process) gives the clean run's history, log,
exported weights and checkpoint, bit for bit, and leaves no temporary behind. The SIGKILL tests of
``test_reliability_pretrain.py`` land on five of these instants, through the CLI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import histofm
from histofm.train import fit, loop
from histofm.train.checkpoint import load_training_state
from histofm.train.config import TrainConfig
from histofm.utils import atomic_path
from histofm.utils.objective import Objective

SRC = Path(histofm.__file__).parent
# The traced code (by qualified name): the functions of the write path that change files. The child
# dies when one of them is entered or left (for a generator such as atomic_path: also at its yield and
# when it resumes), so between any two of its file operations; a death between the lines of one of
# them is the business of test_extract_killed_anywhere.py, which walks atomic_path line by line.
TRACED = {
    str(SRC / "train" / "checkpoint.py"): {"save_training_state", "export_backbone"},
    str(SRC / "train" / "logs.py"): {"RunLogger.__init__", "RunLogger.log"},
    str(SRC / "train" / "loop.py"): {"fit.<locals>.save", "_export"},
    str(SRC / "utils" / "__init__.py"): {"atomic_path"},  # its clean-up of stale temporaries finds none here
}
TIMING = ("sec_per_step", "samples_per_sec")  # wall-clock fields of log.jsonl


class Toy(Objective):
    """A regression with dropout (the resume must restore the random state too)."""

    export_name = "net"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": (self.net(x).squeeze(-1) - y).pow(2).mean()}

    def exported_module(self) -> nn.Module:
        return self.net


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=g)
    return [(x[i], x[i].sum()) for i in range(24)]


def _curve(history: list[dict], path: Path, title: str = "") -> None:
    """Stands in for the PNG loss curve (its drawing is most of a run's time here): the losses, written the same way."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps([h["loss"] for h in history]))


def _train(out: Path) -> list[dict]:
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, ckpt_every=2, log_every=1, monitor_every=0, resume=True,
                      out_dir=str(out), device="cpu", progress=False, tensorboard=False)
    return fit(Toy(), _data(), cfg)


_seen, _die_at = [0], [0]


def _event() -> None:
    _seen[0] += 1
    if _seen[0] == _die_at[0]:
        os._exit(9)


def _traced(frame, event, arg):  # noqa: ANN001, ANN202
    """Global trace function: the calls (and resumptions) of the traced functions, and their returns."""
    code = frame.f_code
    if code.co_qualname not in TRACED.get(code.co_filename, ()):
        return None
    _event()

    def returns(frame, event, arg):  # noqa: ANN001, ANN202
        if event == "return":
            _event()
        return returns

    return returns


def _killed_at_event(out: Path, n: int) -> bool:
    """Fork; the child trains and dies at its ``n``-th traced event. True when it died, False when it finished."""
    pid = os.fork()
    if pid == 0:
        try:
            _seen[0], _die_at[0] = 0, n
            with open(os.devnull, "w") as sys.stdout:  # "no checkpoint; starting from step 0"
                sys.settrace(_traced)
                _train(out)
                sys.settrace(None)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 9


def _state(out: Path) -> dict:
    """Everything that must match the clean run."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ckpt = load_training_state(out / "checkpoint.pt")
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "log": [{k: v for k, v in r.items() if k not in TIMING} for r in log],
        "net": load_file(out / "net.safetensors"),
        "net.json": json.loads((out / "net.json").read_text()),
        "step": ckpt["step"], "method": ckpt["method"], "optimizer": ckpt["optimizer"]["state"],
        "history": ckpt["history"], "curve": json.loads((out / "loss_curve.png").read_text()),
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_kill_between_any_two_file_operations_is_resumed_exactly(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(loop, "plot_loss_curve", _curve)
    _train(tmp_path / "clean")
    ref = _state(tmp_path / "clean")
    assert ref["step"] == 4 and len(ref["log"]) == 4 and ref["curve"] == [h["loss"] for h in ref["history"]]
    for n in range(1, 2000):
        out = tmp_path / f"n{n}"
        if not _killed_at_event(out, n):
            break  # the child finished before event n: every instant was tried
        if (out / "checkpoint.pt").exists():  # what the kill left under real names is complete
            assert load_training_state(out / "checkpoint.pt")["step"] in (2, 4), n
        if (out / "net.safetensors").exists():
            load_file(out / "net.safetensors")
        _train(out)
        got = _state(out)
        bad = [k for k in ref if not _same(got[k], ref[k])]
        assert not bad, f"killed at traced event {n}, the resumed run differs in {bad}: {got['files']}"
    else:
        pytest.fail("the run never finished within 2000 traced events")
    assert n > 30  # the child really died at many instants (at 45 with the engine of December 2026)
