"""Shards from slides (read back with the ``webdataset`` package) and the resumable stream over them.

* the shards are WebDataset: ``webdataset`` and ``tarfile`` read every tile, its metadata matches
  the slide's tiling, and its pixels match the slide read directly (to JPEG error);
* the stream's order is a pure function of the step: starting at step ``s`` gives the tail of
  the run started at 0, in the main process or through DataLoader workers;
* ranks x workers read disjoint samples that cover each epoch;
* ``histofm pretrain --data SHARDS`` SIGKILLed mid-run, then ``--resume``, uses exactly the
  samples of a clean run at every step (the engine's sample trace) and ends with the same losses.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from histofm.data import sample_path
from histofm.data.shards import ShardSettings, ShardStream, write_shards
from histofm.errors import HistofmError

MPPS = (2.0, 4.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    slide = root / "slide0.svs"
    shutil.copy(sample_path("cmu_small_region"), slide)
    write_shards([slide], root / "shards", ShardSettings(target_mpps=MPPS, tile_size=32, shard_size=16), progress=False)
    return root / "shards"


def test_webdataset_reads_every_tile_with_its_metadata(shards: Path) -> None:
    import webdataset as wds

    from histofm.wsi import open_slide, select_tiles, tile_spec

    index = json.loads((shards / "index.json").read_text())
    urls = [str(shards / s["file"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == index["samples"] == sum(s["samples"] for s in index["shards"])
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(index["samples"])]
    assert index["tiles"]["target_mpps"] == list(MPPS) and index["tiles"]["tile_size"] == 32
    # Every tile of the slide's own tiling (both magnifications), once.
    with open_slide(shards.parent / "slide0.svs") as slide:
        want = set()
        for mpp in MPPS:
            coords = select_tiles(slide, tile_spec(slide, mpp, 32)).coords
            want |= {(mpp, int(x), int(y)) for x, y in coords}
            assert index["slides"][0]["tiles"][f"{mpp:g}"] == len(coords)
        got = [(s["json"]["mpp"], s["json"]["x"], s["json"]["y"]) for s in samples if s["json"]["slide"] == "slide0"]
        assert len(got) == len(set(got)) and set(got) == want
        for s in samples[:: max(len(samples) // 6, 1)]:
            meta = s["json"]
            assert meta["magnification"] == pytest.approx(10 / meta["mpp"]) and meta["tile_size"] == 32
            assert meta["level0_mpp"] == pytest.approx(slide.mpp)
            direct = slide.read_region_mpp(meta["x"], meta["y"], 32, meta["mpp"])
            buf = io.BytesIO()
            direct.save(buf, format="JPEG", quality=index["tiles"]["jpeg_quality"])
            stored = np.asarray(s["jpg"].convert("RGB"))
            np.testing.assert_array_equal(stored, np.asarray(Image.open(buf).convert("RGB")))  # one JPEG round trip
    # Plain tar reads them too; files are complete (no temporaries) with the usual permissions.
    with tarfile.open(urls[0]) as tar:
        names = tar.getnames()
        Image.open(io.BytesIO(tar.extractfile(names[0]).read())).verify()
    assert names[:2] == ["000000000.jpg", "000000000.json"]
    assert not [f for f in shards.iterdir() if f.name.startswith(".")]
    assert {stat.S_IMODE(f.stat().st_mode) for f in shards.iterdir()} == {0o644}


def _keys(stream: ShardStream, workers: int, **plan) -> list[list[str]]:
    stream.plan_steps(seed=3, num_workers=workers, **plan)
    return [keys for _, keys in DataLoader(stream, batch_size=None, num_workers=workers)]


def test_order_is_a_function_of_the_step(shards: Path) -> None:
    stream = ShardStream(shards, buffer_size=20)
    full = _keys(stream, 2, global_batch=6, stop_step=40)  # 2 streams x 20 batches of 6: into epoch 1
    assert full[-1][-1].startswith("1/") and full[0][0].startswith("0/")
    assert full == [stream.step_keys(t) for t in range(40)]  # workers serve the planned streams
    assert _keys(stream, 2, global_batch=6, start_step=5, stop_step=12) == full[5:12]  # resume mid-run
    assert _keys(stream, 2, global_batch=6, start_step=34, stop_step=40) == full[34:]  # past an epoch's end
    stream.plan_steps(seed=3, global_batch=6, num_workers=2, start_step=2, stop_step=9)
    assert [keys for _, keys in stream] == full[2:9]  # read in this process: the same steps, in turn
    batch, _ = next(iter(DataLoader(stream, batch_size=None)))
    assert tuple(batch.shape) == (6, 3, 32, 32)


def test_ranks_and_workers_read_disjoint_samples_covering_each_epoch(shards: Path) -> None:
    n = len(ShardStream(shards))
    for world, workers in ((2, 2), (1, 3)):
        seen: dict[int, list[int]] = {0: [], 1: []}
        for rank in range(world):
            stream = ShardStream(shards, buffer_size=50)
            stream.plan_steps(seed=0, global_batch=4 * world, rank=rank, world_size=world, num_workers=workers, stop_step=1)
            for v in range(workers):
                for epoch, i in stream.stream_samples(rank * workers + v):
                    if epoch == 2:
                        break
                    seen[epoch].append(i)
        for epoch in (0, 1):
            assert sorted(seen[epoch]) == list(range(n)), (world, workers, epoch)  # no sample twice, none left out
        assert seen[0] != seen[1]  # a new shard permutation and buffer order each epoch


def test_bad_shard_folders_say_what_to_do(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(HistofmError, match="holds no index.json; write the shards with `histofm shard`"):
        ShardStream(tmp_path)
    stream = ShardStream(shards)
    with pytest.raises(HistofmError, match=r"fewer than the 64 streams .*\(--shard-size\)"):
        stream.plan_steps(seed=0, global_batch=64, world_size=8, num_workers=8, stop_step=1)
    with pytest.raises(HistofmError, match="divisible by the number of processes"):
        stream.plan_steps(seed=0, global_batch=5, world_size=2, stop_step=1)
    with pytest.raises(HistofmError, match="already holds shards"):
        write_shards([sample_path("cmu_small_region")], shards, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "shard-000001.tar").write_bytes(b"not a tar")
    stream = ShardStream(broken)
    with pytest.raises(HistofmError, match="not a tar file.*write the shards again"):
        stream.read_image(16)


# ------------------------------------------------------------------------ kill -9, then --resume
STEPS = 20
ARGS = [
    "pretrain", "--method", "simclr", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "8",
    "--steps", str(STEPS), "--workers", "2", "--no-progress", "--device", "cpu", "--set", "ckpt_every=2",
    "--set", "log_every=1", "--set", "monitor_every=0", "--set", "proj_hidden_dim=32", "--set", "backbone.depth=1",
    "--set", "backbone.patch_size=8", "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2",
]


KILL_STEP = 9  # the run stalls here: checkpoint of step 8 in place, 9 steps logged, step 9's samples traced
# The CLI, stalled once it has traced the samples of step N: argv = [N, marker, *cli_args]. The kill then
# lands at one planned step; a race against the run could let a busy CI machine finish it first.
STALLING_CLI = """
import sys, time
import histofm.train.data as data
n, marker = int(sys.argv[1]), sys.argv[2]
real_record = data.SampleTrace.record
def record(self, step, keys):
    real_record(self, step, keys)
    if step == n:
        open(marker, "w").close()
        time.sleep(600)
data.SampleTrace.record = record
from histofm.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _run(shards: Path, out: Path, trace: Path, *, resume: bool, stall: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HISTOFM_SAMPLE_TRACE": str(trace)}
    head = ["-m", "histofm"] if stall is None else ["-c", STALLING_CLI, str(KILL_STEP), str(stall)]
    cmd = [sys.executable, *head, *ARGS, "--data", str(shards), "--out", str(out), *(["--resume"] if resume else [])]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _trace(trace: Path) -> dict[int, list[str]]:
    """Step -> keys; a step recorded again after a resume keeps its last record."""
    out = {}
    for line in (trace / "samples.rank0.txt").read_text().splitlines():
        step, keys = line.split("\t")
        out[int(step)] = keys.split()
    return out


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_kill_then_resume_streams_the_clean_runs_samples(shards: Path, tmp_path: Path) -> None:
    clean = _run(shards, tmp_path / "clean", tmp_path / "trace_clean", resume=False)
    assert clean.wait(timeout=600) == 0, clean.stderr.read()
    clean.stderr.close()
    ref = _trace(tmp_path / "trace_clean")
    assert sorted(ref) == list(range(STEPS)) and all(len(k) == 8 for k in ref.values())

    out, trace, marker = tmp_path / "run", tmp_path / "trace", tmp_path / "stalled"
    proc = _run(shards, out, trace, resume=False, stall=marker)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()[-2000:]}"
    # Kill mid-run: a checkpoint exists and the run went past it (so the resume must skip within the stream).
    lines = (out / "log.jsonl").read_text().count("\n") if (out / "log.jsonl").exists() else 0
    assert (out / "checkpoint.pt").exists() and 5 <= lines < STEPS - 2, lines
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = max(_trace(trace))
    assert 4 <= killed_at < STEPS - 1
    rerun = _run(shards, out, trace, resume=True)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    rerun.stderr.close()
    steps = [int(line.split("\t")[0]) for line in (trace / "samples.rank0.txt").read_text().splitlines()]
    assert len(steps) > STEPS and steps[-1] == STEPS - 1  # some steps ran twice: the resume started mid-stream
    assert _trace(trace) == ref
    assert _losses(out) == _losses(tmp_path / "clean")  # same samples, same views, same updates


def test_shard_command(tmp_path: Path, capsys) -> None:
    from histofm.cli import main

    slide = tmp_path / "a.svs"
    shutil.copy(sample_path("cmu_small_region"), slide)
    missing = tmp_path / "missing.svs"
    out = tmp_path / "shards"
    code = main(["shard", str(slide), str(missing), "--target-mpp", "4.0,8.0", "--tile-size", "32",
                 "--shard-size", "8", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "missing.svs" in captured.err  # the bad slide is reported, the good one written
    index = json.loads((out / "index.json").read_text())
    assert [s["slide"] for s in index["slides"]] == ["a"] and index["failed"][0]["path"] == str(missing)
    assert len(index["slides"][0]["fingerprint"]) == 64 and index["provenance"]["histofm_version"]
    assert set(index["slides"][0]["tiles"]) == {"4", "8"} and index["samples"] == sum(index["slides"][0]["tiles"].values())
    assert f"{index['samples']} tiles from 1 slides in {len(index['shards'])} shards" in captured.out
    assert main(["shard", str(slide), "--quality", "0", "--out", str(tmp_path / "q")]) == 2
    assert "--quality must lie in 1..100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shard", str(slide), "--target-mpp", "0.5,x", "--out", str(tmp_path / "x")])
