"""Data parallelism: two gloo processes on CPU give the same run as one process with the same global batch."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from gloo import free_port, gloo_rank
from histofm.data.datasets import bundled_tiles
from histofm.methods.registry import build_method
from histofm.train import TrainConfig, fit
from histofm.utils.distributed import gather_with_grad

STEPS, BATCH = 4, 16


def _method():
    torch.manual_seed(0)
    # SimCLR with in-batch negatives from every rank; no BatchNorm (CPU has no SyncBatchNorm).
    return build_method(
        "simclr", "vit_tiny_patch16_224", img_size=32,
        overrides={"backbone": dict(depth=1, patch_size=8, embed_dim=32, num_heads=2), "proj_hidden_dim": 32,
                   "proj_dim": 16, "proj_bn": False, "temperature": 0.2},
    )


def _data():
    return bundled_tiles(32, sources=("hgsc_nest", "hgsc_stroma"), mode="random", num_per_source=24, seed=0)


def _cfg(out_dir: str) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-3, progress=False, monitor_every=0, out_dir=out_dir,
                       ckpt_every=0, seed=3)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        # the gradient-preserving gather: d(sum of squares of gathered x)/dx = 2 x * world (every rank's loss uses x)
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        (gather_with_grad(x) ** 2).sum().backward()
        torch.testing.assert_close(x.grad, 2 * x.detach() * world)
        method, transform = _method()
        hist = fit(method, _data(), _cfg(out_dir), transform=transform)
        if rank == 0:
            torch.save({"losses": [h["loss"] for h in hist], "state": method.state_dict()}, os.path.join(out_dir, "ddp.pt"))


def test_two_gloo_ranks_match_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "ddp.pt", weights_only=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        method, transform = _method()
        single = fit(method, _data(), _cfg(str(tmp_path / "single")), transform=transform)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor([h["loss"] for h in single]), rtol=1e-5, atol=1e-6)
    assert ddp["losses"][-1] != ddp["losses"][0]  # it trained
    for name, value in method.state_dict().items():
        # atol: the key bias has a zero gradient in exact arithmetic; Adam turns its float noise into tiny steps
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=3e-5, msg=name)
    assert (tmp_path / "ddp" / "backbone.safetensors").is_file()  # rank 0 wrote the outputs
