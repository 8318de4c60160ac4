"""FSDP2: two gloo ranks with sharded parameters train like one process with the same global batch.

DINO exercises what sharding makes delicate: a frozen EMA teacher updated from the
student's shards, centering buffers all-reduced over ranks, the collapse monitor
(a forward outside ``forward``), gradient clipping over sharded gradients, and a
checkpoint that must hold full tensors so that a run sharded over two ranks can
resume on one (that sharded run also has its blocks compiled: FSDP2 with
``torch.compile`` gives the eager numbers).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from gloo import free_port, gloo_rank
from histofm import accel
from histofm.data.datasets import bundled_tiles
from histofm.methods.registry import build_method
from histofm.train import TrainConfig, fit, read_log

STEPS, BATCH = 4, 8  # drop path off below: per-rank random depth would make ranks differ from one process
TINY = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "n_local_crops": 2, "drop_path_rate": 0.0,
        "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}


def _method():
    torch.manual_seed(0)
    return build_method("dino", "vit_tiny_patch8_224", img_size=32, overrides=TINY)


def _data():
    return bundled_tiles(32, sources=("hgsc_nest", "hgsc_stroma"), mode="random", num_per_source=12, seed=0)


def _cfg(out_dir: str, **kw) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-3, progress=False, monitor_every=2, monitor_samples=8,
                       out_dir=out_dir, ckpt_every=0, seed=5, **kw)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    with gloo_rank(rank, world, port):
        method, transform = _method()
        hist = fit(method, _data(), _cfg(os.path.join(root, "fsdp"), parallel="fsdp"), transform=transform)
        assert accel.is_fsdp(method)
        # the student's parameters really are shards: this rank holds about half of each
        w = method.student.backbone.blocks[0].mlp.fc1.weight
        assert w.to_local().shape[0] == w.shape[0] // world
        if rank == 0:
            torch.save({"history": hist}, os.path.join(root, "fsdp.pt"))
        # an interrupted sharded run, its blocks compiled: its checkpoint is resumed below on ONE eager process
        method, transform = _method()
        fit(method, _data(), _cfg(os.path.join(root, "cut"), parallel="fsdp", compile=True, stop_after=2),
            transform=transform)
        assert method.student.backbone.blocks[0]._compiled_call_impl is not None


def test_fsdp_two_ranks_match_one_process_and_resume_on_one(tmp_path) -> None:
    root = tmp_path
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    fsdp_hist = torch.load(root / "fsdp.pt", weights_only=True)["history"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        method, transform = _method()
        single = fit(method, _data(), _cfg(str(root / "single")), transform=transform)
        shutil.copytree(root / "cut", root / "resumed")
        method, transform = _method()
        resumed = fit(method, _data(), _cfg(str(root / "resumed"), resume=True), transform=transform)
    finally:
        torch.set_num_threads(n)

    losses = torch.tensor([h["loss"] for h in single])
    assert losses[-1] != losses[0]  # it trained
    torch.testing.assert_close(torch.tensor([h["loss"] for h in fsdp_hist]), losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor([h["grad_norm"] for h in fsdp_hist]),
                               torch.tensor([h["grad_norm"] for h in single]), rtol=1e-4, atol=1e-6)
    # the monitor ran on the sharded model too, and saw the same embeddings
    monitored = [h["step"] for h in single if "rankme" in h]
    assert monitored and monitored == [h["step"] for h in fsdp_hist if "rankme" in h]
    torch.testing.assert_close(torch.tensor([h["embed_std"] for h in fsdp_hist if "embed_std" in h]),
                               torch.tensor([h["embed_std"] for h in single if "embed_std" in h]), rtol=1e-4, atol=1e-6)
    # rank 0 exported the gathered (full) backbone, equal to the single-process one
    a, b = load_file(root / "fsdp" / "backbone.safetensors"), load_file(root / "single" / "backbone.safetensors")
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=3e-5, msg=k)
    # two ranks -> checkpoint -> one rank: the same run
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed]), losses, rtol=1e-5, atol=1e-6)
    c = load_file(root / "resumed" / "backbone.safetensors")
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=3e-5, msg=k)


def test_fsdp_without_a_process_group_is_a_clear_error() -> None:
    import pytest

    from histofm.errors import HistofmError

    with pytest.raises(HistofmError, match="torchrun"):
        accel.shard_fsdp(torch.nn.Linear(2, 2))


def test_torchrun_pretrain_with_fsdp_matches_one_process(tmp_path) -> None:
    """The documented launch: ``torchrun --nproc-per-node 2 -m histofm pretrain ... --set parallel=fsdp``."""
    import subprocess
    import sys

    args = ["-m", "histofm", "pretrain", "--method", "dino", "--model", "vit_tiny_patch8_224", "--data", "bundled",
            "--img-size", "32", "--batch-size", "8", "--steps", "3", "--no-progress", "--seed", "2",
            "--set", "backbone.depth=2", "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2",
            "--set", "out_dim=64", "--set", "hidden_dim=32", "--set", "bottleneck_dim=16", "--set", "n_local_crops=2",
            "--set", "drop_path_rate=0", "--set", "monitor_every=0", "--set", "log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args, "--out", str(tmp_path / "two"), "--parallel", "fsdp"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("final loss") == 1  # rank 0 reports
    a, b = load_file(tmp_path / "one" / "backbone.safetensors"), load_file(tmp_path / "two" / "backbone.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=3e-5, msg=k)
    la, lb = ([r["loss"] for r in read_log(tmp_path / d / "log.jsonl")] for d in ("one", "two"))
    assert len(la) == 3 and la[-1] != la[0]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6)


def _best_worker(rank: int, world: int, port: int, root: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    def full(method) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone()
                for k, v in get_model_state_dict(method, options=StateDictOptions(full_state_dict=True)).items()}

    with gloo_rank(rank, world, port):
        method, transform = _method()
        scores, seen = iter([3.0, 1.0, 2.0, 2.5, 2.7, 2.8]), []

        def evaluate() -> dict[str, float]:  # scripted: the second evaluation is the best
            seen.append(full(method))
            return {"score": next(scores)}

        cfg = _cfg(os.path.join(root, "best")).replace(steps=6, eval_every=1, best_metric="score", patience=2)
        hist = fit(method, _data(), cfg, transform=transform, evaluate=evaluate)
        assert len(hist) == 4 and hist[-1]["best_step"] == 1  # two evaluations without improvement: stopped
        final = full(method)  # every rank loaded the best weights back, shards included
        assert all(torch.equal(final[k], seen[1][k]) for k in final)


def test_fsdp_keeps_and_restores_the_best_weights_on_every_rank(tmp_path) -> None:
    mp.spawn(_best_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    meta = json.loads((tmp_path / "best" / "backbone.json").read_text())
    assert meta["stopped_early"] and meta["best_step"] == 1 and meta["steps"] == 4
