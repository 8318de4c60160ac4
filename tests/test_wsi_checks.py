"""Checks before work (out dir, device, memory, ranges), the CSV reader, temp-file names, slide locks, messages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histofm.checks import check_alloc, check_device, check_out_dir, check_range
from histofm.errors import HistofmError
from histofm.tables import read_csv_table
from histofm.utils import TEMP_PATTERN, atomic_path, remove_stale_temps, temp_name
from histofm.wsi.locks import lock_path, slide_lock, try_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_check_out_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(HistofmError, match="--out .*file is an existing file"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(HistofmError, match="lies under the file"):
        check_out_dir(tmp_path / "file" / "sub" / "deeper", flag="--json")
    with pytest.raises(HistofmError, match="cannot be written"):
        check_out_dir("/proc/histofm-cannot-make-this")  # even root cannot create folders in /proc
    before = sorted(os.listdir(tmp_path))
    check_out_dir(tmp_path / "new" / "out")
    assert sorted(os.listdir(tmp_path)) == before  # nothing created, the probe removed
    (tmp_path / "new").mkdir()
    check_out_dir(tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []


def test_check_device() -> None:
    assert check_device(None) is None and check_device("cpu") == "cpu"
    with pytest.raises(HistofmError, match="--device 'gpu0' is not a device"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(HistofmError, match="has none; use --device cpu"):
            check_device("cuda")
    with pytest.raises(HistofmError, match="cuda:99"):
        check_device("cuda:99")


def test_check_alloc_and_range() -> None:
    check_alloc(1 << 20, "a small thing", "--x")
    with pytest.raises(HistofmError, match=r"PiB of memory.*change --target-mpp"):
        check_alloc(2.0**53, "The grid", "--target-mpp")
    with pytest.raises(HistofmError, match="unbounded"):
        check_alloc(float("inf"), "The grid", "--x")
    check_range(0.5, "--min-tissue", low=0, high=1)
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(HistofmError, match="--min-tissue must be a number"):
            check_range(bad, "--min-tissue", low=0, high=1)
    with pytest.raises(HistofmError, match="above 0"):
        check_range(0, "--target-mpp", low=0, low_open=True)


def test_csv_reader(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_bytes("\ufeffSlide_ID,label\n\na,1\nb , 0 \n".encode())  # BOM, case, blank line, spaces
    t = read_csv_table(p, ["slide_id", "label"], flag="--labels")
    assert t.has_header and [dict(r) for r in t.rows] == [{"slide_id": "a", "label": "1"}, {"slide_id": "b", "label": "0"}]
    assert [r.row for r in t.rows] == [3, 4]
    p.write_text("slide_id,label\na,1\nb,\n")
    with pytest.raises(HistofmError, match="labels.csv row 3 has no value for 'label'.*--labels"):
        read_csv_table(p, ["slide_id", "label"], flag="--labels")
    p.write_text("slide,mpp\nx.svs,0.25\n")
    t = read_csv_table(p, ["slide_path"], optional=["mpp"], aliases={"slide_path": ["slide"]})
    assert t.rows[0]["slide_path"] == "x.svs" and t.rows[0]["mpp"] == "0.25"
    p.write_text("x.svs\ny.svs,0.5\n")  # no header: by position
    t = read_csv_table(p, ["slide_path"], optional=["mpp"])
    assert not t.has_header and [r["slide_path"] for r in t.rows] == ["x.svs", "y.svs"] and t.rows[0]["mpp"] == ""
    p.write_bytes("slide_id,label\ncafé,1\n".encode("latin-1"))
    with pytest.raises(HistofmError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_csv_table(p, ["slide_id", "label"], flag="--labels")
    p.write_bytes("slide_id,label\n".encode("utf-16"))
    with pytest.raises(HistofmError, match="UTF-16 text"):
        read_csv_table(p, ["slide_id", "label"])
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    with pytest.raises(HistofmError, match="img.png is a PNG image, not a CSV"):
        read_csv_table(tmp_path / "img.png", ["slide_id"])
    p.write_text("\n\n")
    with pytest.raises(HistofmError, match="holds no rows"):
        read_csv_table(p, ["slide_id"])
    p.write_text("slide_id,grade\na,1\n")
    with pytest.raises(HistofmError, match="no column 'label'"):
        read_csv_table(p, ["slide_id", "label"], header=True)


def test_temp_names_and_stale_clean_up(tmp_path: Path) -> None:
    name = temp_name("a.h5")
    m = TEMP_PATTERN.match(name)
    assert m and m["name"] == "a.h5" and int(m["pid"]) == os.getpid() and temp_name("a.h5") != name
    user = {".a.h5.tmp": b"1", ".notes.tmp": b"2", "x.tmp": b"3", ".a.h5.histofm-1-short.tmp": b"4"}
    for n, data in user.items():
        (tmp_path / n).write_bytes(data)
    dead = tmp_path / f".a.h5.histofm-{_dead_pid()}-abcdefgh.tmp"
    live = tmp_path / f".a.h5.histofm-{os.getppid()}-abcdefgh.tmp"  # our parent: alive
    old = tmp_path / f".b.h5.histofm-{os.getppid()}-00000000.tmp"
    for f in (dead, live, old):
        f.write_bytes(b"half")
    os.utime(old, (time.time() - 48 * 3600,) * 2)  # older than 24 h: stale even with a live pid
    assert remove_stale_temps(tmp_path / "a.h5") == 1 and not dead.exists() and live.exists() and old.exists()
    assert remove_stale_temps(tmp_path) == 1 and not old.exists() and live.exists()
    assert {n: (tmp_path / n).read_bytes() for n in user} == user  # the user's files are untouched
    with atomic_path(tmp_path / "out.txt") as tmp:
        assert TEMP_PATTERN.match(tmp.name)
        tmp.write_text("done")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_slide_locks(tmp_path: Path) -> None:
    out = tmp_path / "a.h5"
    with slide_lock(out) as mine:
        assert mine and lock_path(out).exists()
        record = json.loads(lock_path(out).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with slide_lock(out) as again:  # held (by a live process): not taken twice
            assert not again
    assert not lock_path(out).exists()
    # A lock of a dead process is broken; one of a live process is respected.
    lock_path(out).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "time": 0}))
    assert try_lock(out) == lock_path(out)
    lock_path(out).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "time": 0}))
    assert try_lock(out) is None
    assert json.loads(lock_path(out).read_text())["pid"] == os.getppid()


def test_messages_name_the_true_cause(tmp_path: Path) -> None:
    from histofm.models.convert import read_state_dict
    from histofm.wsi import open_slide

    png = tmp_path / "picture.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    for suffix in (".pth", ".safetensors", ".png"):
        ckpt = tmp_path / f"weights{suffix}"
        ckpt.write_bytes(png.read_bytes())
        with pytest.raises(HistofmError, match="is a PNG image, not a checkpoint") as e:
            read_state_dict(ckpt)
        assert "Python objects" not in str(e.value)
    folder = tmp_path / "slide.svs"
    folder.mkdir()
    with pytest.raises(HistofmError, match="is a folder, not a slide file") as e:
        open_slide(folder)
    assert "permission" not in str(e.value)
    with pytest.raises(HistofmError, match="PNG image, which OpenSlide cannot read; use --backend image") as e:
        open_slide(png, mpp=0.5, backend="openslide")
    assert "corrupt" not in str(e.value)
