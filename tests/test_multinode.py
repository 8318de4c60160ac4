"""The multi-node ``torchrun`` command of docs/training.md, with two "nodes" on this machine.

Each node is its own ``torchrun --nnodes 2 --node-rank N --nproc-per-node 1 --rdzv-backend c10d
--rdzv-endpoint 127.0.0.1:PORT`` process, as on two machines; the ranks meet through c10d and train
over gloo.

* ``pretrain`` streaming from shards with 2 data workers per rank: the two ranks (x 2 workers)
  read disjoint samples that together cover the first epoch, both ranks run every step, and rank 0
  alone writes the outputs;
* ``extract`` (``--random-init``): the two nodes share the slides and write one feature file each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from gloo import free_port
from histofm.data import sample_path
from histofm.data.shards import ShardSettings, write_shards

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _two_nodes(args: list[str], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Launch the same command as node 0 and node 1 of a 2-node torchrun job; wait for both."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--local-addr", "127.0.0.1", "-m", "histofm", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("slides")
    out = []
    for i in range(2):
        dst = root / f"s{i}.svs"
        shutil.copy(sample_path("cmu_small_region"), dst)
        out.append(dst)
    return out


def test_pretrain_from_shards_on_two_nodes(slides: list[Path], tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    index = write_shards(slides, shards, ShardSettings(target_mpps=(4.0,), tile_size=32, shard_size=4), progress=False)
    n, steps = index["samples"], 12
    trace = tmp_path / "trace"
    args = ["pretrain", "--method", "simclr", "--model", "vit_tiny_patch16_224", "--data", str(shards),
            "--img-size", "32", "--batch-size", "8", "--steps", str(steps), "--workers", "2", "--no-progress",
            "--device", "cpu", "--set", "monitor_every=0", "--set", "proj_hidden_dim=32", "--set", "backbone.depth=1",
            "--set", "backbone.patch_size=8", "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2",
            "--out", str(tmp_path / "run")]
    _two_nodes(args, {**ENV, "HISTOFM_SAMPLE_TRACE": str(trace)})
    per_rank = []
    for rank in (0, 1):
        lines = (trace / f"samples.rank{rank}.txt").read_text().splitlines()
        assert [int(line.split("\t")[0]) for line in lines] == list(range(steps))  # every step on both ranks
        per_rank.append([key for line in lines for key in line.split("\t")[1].split()])
    assert all(len(keys) == steps * 4 for keys in per_rank)  # 4 = 8 / 2 ranks per step
    first_epoch = [int(k.split("/")[1]) for keys in per_rank for k in keys if k.startswith("0/")]
    assert sorted(first_epoch) == list(range(n))  # disjoint (no sample twice) and covering the epoch
    assert not set(per_rank[0]) & set(per_rank[1])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == steps - 1
    assert (tmp_path / "run" / "backbone.safetensors").is_file()


def test_extract_on_two_nodes(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "feats"
    args = ["extract", *map(str, slides), "--model", "vit_tiny_patch16_224", "--random-init", "--out", str(out),
            "--tile-size", "112", "--target-mpp", "2.0", "--batch-size", "8", "--workers", "0", "--no-progress",
            "--device", "cpu", "--layout", "flat"]
    done = _two_nodes(args, ENV)
    assert sum(d.stdout.count("2 slides: 2 done") for d in done) == 1, [d.stdout for d in done]  # one summary
    for s in slides:
        with h5py.File(out / f"{s.stem}.h5") as f:
            assert f["features"].shape[0] == f["coords"].shape[0] > 0
            assert f["features"].shape[1] == 192
