"""Semi-supervised training through the one engine: step batches, exact resume (also after kill -9), bf16, DDP."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from histofm import HistofmError
from histofm.learning import SEMI_METHODS, build_semi_method
from histofm.learning.semi import Classifier, SemiData, SemiSteps, SmallConvNet
from histofm.learning.tasks import render_synthetic_nuclei
from histofm.train.semi import fit_semi, semi_config
from histofm.utils import seed_everything


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> SemiData:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 3
    x = render_synthetic_nuclei(y, 12, g)  # (24, 3, 12, 12) uint8, generated H&E nuclei
    return SemiData(x_l=x[:6], y_l=y[:6], x_u=x[6:], y_u=y[6:])


def _method(name: str, seed: int = 0):
    seed_everything(seed)
    kw = {"threshold": 0.0} if name in ("fixmatch", "pseudolabel") else {}  # every unlabelled image counts
    if name == "pseudolabel":
        kw.update(t1=0.0, t2=0.5)  # the unlabelled weight ramps within the run, so its buffer matters
    return build_semi_method(name, Classifier(SmallConvNet(4, 1), 3), seed=seed, **kw)


def _cfg(tmp, **kw):
    kw = {"steps": 6, "batch_size": 4, "lr": 0.05, "seed": 3, "device": "cpu", "out_dir": str(tmp), "ckpt_every": 0,
          "log_every": 1, **kw}
    return semi_config(**kw)


def test_step_batches_are_a_pure_function_of_the_step_and_split_over_ranks(data) -> None:
    one = SemiSteps(data, mu=2)
    one.plan_steps(seed=5, global_batch=4, stop_step=3)
    batches = list(one)
    assert len(batches) == 3
    b, keys = batches[1]
    assert b["x_l"].shape == (4, 3, 12, 12) and b["x_u"].shape == (8, 3, 12, 12) and b["x_l"].dtype == torch.uint8
    assert len(keys) == 12 and torch.equal(b["y_u"], data.y_u[[int(k[1:]) for k in keys[4:]]])
    # A stream planned from step 1 (a resumed run) yields the very same batch for step 1.
    late = SemiSteps(data, mu=2)
    late.plan_steps(seed=5, global_batch=4, start_step=1, stop_step=2)
    (b1, keys1), = list(late)
    assert keys1 == keys and all(torch.equal(b[k], b1[k]) for k in b)
    # Two ranks: the halves of the same global batch (labelled and unlabelled parts alike).
    halves = []
    for r in range(2):
        s = SemiSteps(data, mu=2)
        s.plan_steps(seed=5, global_batch=4, rank=r, world_size=2, start_step=1, stop_step=2)
        halves.append(next(iter(s))[1])
    assert halves[0][:2] + halves[1][:2] == keys[:4] and halves[0][2:] + halves[1][2:] == keys[4:]
    with pytest.raises(HistofmError, match="mu must be"):
        SemiSteps(data, mu=0)


@pytest.mark.parametrize("name", SEMI_METHODS)
def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path, data, name: str) -> None:
    full = _method(name)
    h_full = fit_semi(full, data, _cfg(tmp_path / "full"), mu=2, recalibrate_bn=False)
    part = _method(name)
    fit_semi(part, data, _cfg(tmp_path / "cut", stop_after=3), mu=2, recalibrate_bn=False)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    resumed = _method(name, seed=1)  # another initialisation: everything must come from the checkpoint
    h_res = fit_semi(resumed, data, _cfg(tmp_path / "cut", resume=True), mu=2, recalibrate_bn=False)
    assert [h["loss"] for h in h_res] == [h["loss"] for h in h_full]  # per-step losses, bit for bit
    assert h_full[3]["lr"] == pytest.approx(0.05 * 0.7730104534)  # FixMatch's lr * cos(7 pi k / 16 K) at k = 3 of 6
    sd_full, sd_res = full.state_dict(), resumed.state_dict()
    assert sd_full.keys() == sd_res.keys()
    for k in sd_full:  # parameters, BatchNorm statistics, the teacher and the ramped weights alike
        assert torch.equal(sd_full[k], sd_res[k]), k
    # log.jsonl of the interrupted + resumed run reads like the uninterrupted run's.
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("full", "cut")]
    assert [r["step"] for r in logs[1]] == list(range(6))
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]] == [h["loss"] for h in h_full]


def test_resume_refuses_another_mu(tmp_path, data) -> None:
    fit_semi(_method("fixmatch"), data, _cfg(tmp_path, stop_after=2), mu=2, recalibrate_bn=False)
    with pytest.raises(HistofmError, match="mu=2 but this run has mu=3"):
        fit_semi(_method("fixmatch"), data, _cfg(tmp_path, resume=True), mu=3)


def test_one_bf16_step_learns_and_stays_finite(tmp_path, data) -> None:
    m = _method("fixmatch")
    before = [p.detach().clone() for p in m.trainable_parameters()]
    h = fit_semi(m, data, _cfg(tmp_path, steps=1, precision="bf16"), mu=2)
    assert torch.isfinite(torch.tensor(h[0]["loss"])) and not h[0]["skipped"]
    assert any(not torch.equal(a, b) for a, b in zip(before, m.trainable_parameters()))
    assert all(bool(torch.isfinite(v).all()) for v in m.deployed().state_dict().values() if v.is_floating_point())


# The CLI, SIGKILLed right after its Nth checkpoint write, before the rename: argv = [n, *cli_args].
KILLED_CLI = """
import os, signal, sys
import torch
n, real_save, calls = int(sys.argv[1]), torch.save, [0]
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
from histofm.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_cli_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path, capsys) -> None:
    import os
    import signal
    import subprocess
    import sys

    from histofm.cli import main
    from test_semi import _write_folder

    _write_folder(tmp_path)
    args = ["semi", "--method", "meanteacher", "--data", str(tmp_path / "tiles"), "--labels",
            str(tmp_path / "labels.csv"), "--steps", "6", "--ckpt-every", "2", "--img-size", "16", "--width", "4",
            "--batch-size", "4", "--mu", "2", "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0, capsys.readouterr().err
    # Killed while writing the step-4 checkpoint (after the bytes, before the rename): step 2's is what survives.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_CLI, "2", *args, "--out", str(tmp_path / "cut")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, res = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert full.keys() == res.keys() and all(torch.equal(full[k], res[k]) for k in full)
    assert (tmp_path / "cut" / "predictions.csv").read_text() == (tmp_path / "full" / "predictions.csv").read_text()
    logs = [[{k: v for k, v in json.loads(line).items() if k not in ("sec_per_step", "samples_per_sec")}
             for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("full", "cut")]
    assert logs[1] == logs[0]  # the killed-and-resumed run's log reads like the clean run's
    for name in ("config.json", "loss_curve.png", "metrics.json", "loss.png"):
        assert (tmp_path / "cut" / name).is_file(), name
    record = json.loads((tmp_path / "cut" / "model.json").read_text())
    assert record["objective"] == "MeanTeacher" and record["num_classes"] == 3 and record["steps"] == 6
    assert record["finished"] and record["mu"] == 2 and record["classes"] == ["lymphocyte", "spindle", "tumour"]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from gloo import gloo_rank

    with gloo_rank(rank, world, port):
        g = torch.Generator().manual_seed(0)
        y = torch.arange(24) % 3
        x = render_synthetic_nuclei(y, 12, g)
        method = _method("fixmatch")
        fit_semi(method, SemiData(x[:6], y[:6], x[6:]), _cfg(out_dir, steps=3), mu=2)
        torch.save(method.state_dict(), f"{out_dir}/rank{rank}.pt")


def test_two_gloo_ranks_split_each_step_and_stay_in_sync(tmp_path, data, monkeypatch) -> None:
    """Under DDP each rank trains on its half of every step's labelled and unlabelled images; weights stay equal."""
    import torch.multiprocessing as mp

    from gloo import free_port

    monkeypatch.setenv("HISTOFM_SAMPLE_TRACE", str(tmp_path / "trace"))
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # DDP kept the replicas equal
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "log.jsonl").is_file()  # written by rank 0
    traces = [dict(line.split("\t") for line in (tmp_path / "trace" / f"samples.rank{r}.txt").read_text().splitlines())
              for r in range(2)]
    one = SemiSteps(SemiData(data.x_l, data.y_l, data.x_u), mu=2)
    one.plan_steps(seed=3, global_batch=4, stop_step=3)
    for step, (_, keys) in enumerate(one):
        halves = [traces[r][str(step)].split() for r in range(2)]
        assert halves[0][:2] + halves[1][:2] == keys[:4] and halves[0][2:] + halves[1][2:] == keys[4:]
