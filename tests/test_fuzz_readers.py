"""Fuzz the slide, image and DICOM readers with random, truncated and flipped bytes (issue #11).

Seeds are real files: the bundled Aperio ``.svs``, a small pyramidal TIFF and a PNG written
here, the bundled H&E JPEG and three bundled DICOM files (uncompressed, RLE, JPEG 2000). From
each seed, seeded cases are derived: random bytes behind the format's magic (``II*\\0``, JPEG SOI,
PNG signature, DICOM preamble) and without, truncations inside the header, the IFD / chunk area
and the pixel data, and random byte flips. Hand-made hostile headers (a TIFF, PNG, JPEG and
DICOM that declare a gigantic image) are added.

Every case goes through the public API (``open_slide`` + ``read_region`` + ``thumbnail``;
``tile_dataset`` over a folder for images; ``read_dicom`` + ``to_rgb_slices`` for DICOM) and must
end in success (a flipped pixel byte may decode) or one :class:`HistofmError` sentence naming the
file. C libraries (OpenSlide, libtiff, libjpeg, OpenJPEG) may crash or loop on hostile input, so
the cases run in a child process (this file run as a script) that records each outcome as a JSON
line; a crash shows as a negative exit code, a hang as a timeout, and the test names the last
case started.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from histofm.data import SAMPLES_DIR, sample_path

DICOM_SEEDS = ("emri_small.dcm", "OBXXXX1A_rle.dcm", "US1_J2KI.dcm")
CHILD_TIMEOUT_S = 150  # the whole corpus; it takes about 15 s
CASE_TIMEOUT_S = 20  # one case; a longer one is a hang (faulthandler dumps its stack and exits)


# ------------------------------------------------------------------------------------ the child
def _run_case(case: dict) -> None:
    """Open one fuzzed file through the public API the way a user would, reading a few tiles."""
    path = Path(case["path"])
    kind = case["kind"]
    if kind == "dicom":
        from histofm.medical import read_dicom, to_rgb_slices

        for rgb in to_rgb_slices(read_dicom(path)):
            assert rgb.ndim == 3 and rgb.shape[-1] == 3 and rgb.dtype == np.uint8, rgb.shape
        return
    if kind == "folder":
        from histofm.data.datasets import tile_dataset

        dataset = tile_dataset(path.parent)
        for i in range(len(dataset)):
            assert dataset[i].mode == "RGB"
        return
    from histofm.wsi import open_slide

    with open_slide(path, backend=case["backend"]) as slide:
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            ds = slide.level_downsamples[level]
            for fx, fy in ((0, 0), (0.5, 0.5), (1, 1)):  # first, middle and last tile of the level
                x, y = max(0, int(fx * w) - 64), max(0, int(fy * h) - 64)
                tile = slide.read_region_array((round(x * ds), round(y * ds)), level, (64, 64))
                assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8, tile.shape
        thumb = slide.thumbnail(128)
        assert thumb.mode == "RGB" and max(thumb.size) <= 128, (thumb.mode, thumb.size)
        if slide.has_mpp:
            assert slide.read_region_mpp(0, 0, 32, slide.mpp * 2).size == (32, 32)


def _child_main(cases_file: str, results_file: str) -> None:
    from histofm import HistofmError

    faulthandler.enable()  # a segfault prints the Python stack of the case on stderr
    cases = json.loads(Path(cases_file).read_text())
    with open(results_file, "w", buffering=1) as out:
        for case in cases:
            out.write(json.dumps({"start": case["name"]}) + "\n")
            faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
            t0 = time.perf_counter()
            try:
                _run_case(case)
                outcome, message = "ok", ""
            except HistofmError as e:
                outcome, message = "HistofmError", str(e)
            except Exception as e:  # any other type is what the test reports
                outcome, message = type(e).__name__, f"{type(e).__module__}.{type(e).__name__}: {e}"[:500]
            faulthandler.cancel_dump_traceback_later()
            seconds = round(time.perf_counter() - t0, 3)
            out.write(json.dumps({"case": case["name"], "outcome": outcome, "message": message, "s": seconds}) + "\n")


# ------------------------------------------------------------------------------------ the corpus
def _flips(rng: random.Random, data: bytes, lo: int, hi: int, n_bytes: int) -> bytes:
    """``data`` with ``n_bytes`` random bytes in ``[lo, hi)`` XORed with random non-zero values."""
    out = bytearray(data)
    for _ in range(n_bytes):
        out[rng.randrange(lo, min(hi, len(out)))] ^= rng.randrange(1, 256)
    return bytes(out)


class Corpus:
    """Writes fuzzed files, one folder per case (so a folder dataset sees only that file)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: list[dict] = []

    def add(self, seed: str, label: str, data: bytes, suffix: str, kinds: list[tuple[str, str]]) -> None:
        name = f"{seed}-{label}"
        folder = self.root / name
        folder.mkdir()
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        for kind, backend in kinds:
            self.cases.append({"name": f"{name}[{kind}:{backend}]", "seed": seed, "path": str(path), "kind": kind,
                               "backend": backend})

    def derive(self, seed: str, data: bytes, suffix: str, kinds: list[tuple[str, str]], *, magic: bytes,
               cuts: list[int], flip_ranges: list[tuple[int, int, int]], rng: random.Random) -> None:
        """Random bytes (with and without ``magic``), truncations at ``cuts``, flips in ``(lo, hi, count)`` ranges."""
        for i, n in enumerate((16, 3000)):
            self.add(seed, f"magic-random{i}", magic + rng.randbytes(n), suffix, kinds)
        self.add(seed, "random", rng.randbytes(700), suffix, kinds)
        for cut in sorted(set(cuts)):
            if 0 < cut < len(data):
                self.add(seed, f"cut{cut}", data[:cut], suffix, kinds)
        for lo, hi, count in flip_ranges:
            for i in range(count):
                self.add(seed, f"flip{lo}-{i}", _flips(rng, data, lo, hi, rng.choice((1, 1, 2, 4, 16))), suffix, kinds)


def _tiff_layout(path: Path) -> list[tuple[int, int, int]]:
    """``(ifd_offset, first_data_offset, last_data_offset)`` of every page, read with tifffile."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [(p.offset, min(p.dataoffsets), max(p.dataoffsets)) for p in tif.pages]


def _small_pyramid(path: Path) -> None:
    """A 2-level JPEG-compressed tiled TIFF (384 x 512, tiles 128) cut from the real slide, with mpp tags."""
    import tifffile

    with tifffile.TiffFile(sample_path("cmu_small_region")) as tif:
        level0 = tif.pages[0].asarray()[1000:1512, 800:1184]  # (512, 384, 3)
    with tifffile.TiffWriter(path) as tw:
        tw.write(level0, tile=(128, 128), photometric="rgb", compression="jpeg", subfiletype=0,
                 resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # 0.5 um/px
        tw.write(np.ascontiguousarray(level0[::2, ::2]), tile=(128, 128), photometric="rgb", compression="jpeg",
                 subfiletype=1)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _hostile(corpus: Corpus, root: Path) -> None:
    """Valid headers (checksums right) that declare gigantic images, with almost no pixel data."""
    import pydicom
    import tifffile

    slide_kinds = [("slide", "auto"), ("slide", "tiffslide"), ("slide", "image")]

    def patched(image: np.ndarray, values: dict[str, int], **kwargs) -> bytes:
        """``image`` written by tifffile, then the named tags' values overwritten in place."""
        seed = root / "hostile_seed.tif"
        tifffile.imwrite(seed, image, photometric="rgb", **kwargs)
        data = bytearray(seed.read_bytes())
        with tifffile.TiffFile(seed) as tif:
            for tag_name, value in values.items():
                tag = tif.pages[0].tags[tag_name]
                fmt = "<I" if tag.dtype == 4 else "<H"  # LONG or SHORT
                data[tag.valueoffset:tag.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, value)
        return bytes(data)

    tiles = np.full((256, 256, 3), 200, np.uint8)
    # A tiled TIFF of 4 tiles whose width and length say 60000: OpenSlide and tiffslide read the
    # missing tiles as blank, so without a guard its thumbnail loops over 200,000 empty tiles.
    data = patched(tiles, {"ImageWidth": 60000, "ImageLength": 60000}, tile=(128, 128), compression="zlib")
    corpus.add("hostile", "tiff-60000-in-4-tiles", data, ".tif", slide_kinds[:2])
    # The same with 2^31 - 1 (tifffile would allocate petabytes), as .tif and as .svs.
    data = patched(tiles, {"ImageWidth": 2**31 - 1, "ImageLength": 2**31 - 1}, tile=(128, 128), compression="zlib")
    corpus.add("hostile", "tiff-gigantic", data, ".tif", slide_kinds)
    corpus.add("hostile", "tiff-gigantic-svs", data, ".svs", slide_kinds[:2])
    # A stripped (untiled) TIFF declaring 60000 x 60000 RGB in one strip of a few bytes.
    data = patched(tiles[:64, :64], {"ImageWidth": 60000, "ImageLength": 60000, "RowsPerStrip": 60000},
                   rowsperstrip=64)
    corpus.add("hostile", "tiff-strip-gigantic", data, ".tif", slide_kinds)
    # PNG: IHDR of 100000 x 100000 RGB (and 6000 x 6000, under Pillow's bomb limit), valid CRCs.
    for side in (100_000, 6000):
        ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
        idat = zlib.compress(b"\x00" + b"\xff" * 3 * 16)
        png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
        corpus.add("hostile", f"png-{side}", png, ".png", [("slide", "auto"), ("folder", "")])
    # JPEG: the real JPEG with its frame header patched to 65000 x 65000, cut after 20 kB.
    jpg = bytearray(sample_path("hgsc_nest").read_bytes()[:20_000])
    sof = next(i for i in range(2, len(jpg) - 9) if jpg[i] == 0xFF and jpg[i + 1] in (0xC0, 0xC1, 0xC2))
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    corpus.add("hostile", "jpeg-65000", bytes(jpg), ".jpg", [("slide", "auto"), ("folder", "")])
    # DICOM: the uncompressed MR with Rows = Columns = 65535 and 10 frames of pixel data left as is.
    ds = pydicom.dcmread(SAMPLES_DIR / "dicom" / "emri_small.dcm")
    ds.Rows = ds.Columns = 65535
    ds.save_as(root / "hostile.dcm")
    corpus.add("hostile", "dicom-65535", (root / "hostile.dcm").read_bytes(), ".dcm", [("dicom", "")])
    ds.NumberOfFrames = 2**31 - 1
    ds.Rows = ds.Columns = 64
    ds.save_as(root / "hostile.dcm")
    corpus.add("hostile", "dicom-frames", (root / "hostile.dcm").read_bytes(), ".dcm", [("dicom", "")])


def build_corpus(root: Path) -> list[dict]:
    """All cases (seeded, so the same every run)."""
    from PIL import Image

    rng = random.Random(11)
    corpus = Corpus(root)
    seeds = root / "_seeds"
    seeds.mkdir(parents=True)
    tiff_magic = b"II*\x00"

    # The real Aperio slide (1.9 MB; its IFDs sit after the tile data).
    svs = sample_path("cmu_small_region")
    data = svs.read_bytes()
    (ifd0, first0, last0), (ifd1, _, _) = _tiff_layout(svs)[:2]
    corpus.derive(
        "svs", data, ".svs", [("slide", "auto"), ("slide", "tiffslide")], magic=tiff_magic, rng=rng,
        cuts=[2, 4, 8, 300_000, ifd0 - 1, ifd0 + 1, ifd0 + 60, ifd0 + 400, ifd0 + 1500, ifd1 + 30, len(data) - 1],
        flip_ranges=[(0, 16, 4), (ifd0, ifd0 + 3000, 16), (first0, last0, 3)],
    )
    for at in (first0 + 1000, (first0 + last0) // 2):  # a copy that stopped early: zeros where tiles were
        corpus.add("svs", f"zeros{at}", data[:at] + bytes(ifd0 - at) + data[ifd0:], ".svs", [("slide", "auto")])

    # A small pyramidal TIFF (IFDs before the tile data), read by every backend.
    pyr = seeds / "pyramid.tif"
    _small_pyramid(pyr)
    data = pyr.read_bytes()
    (ifd0, first0, last0), (ifd1, first1, _) = _tiff_layout(pyr)
    corpus.derive(
        "tif", data, ".tif", [("slide", "auto"), ("slide", "tiffslide"), ("slide", "image")], magic=tiff_magic,
        rng=rng, cuts=[3, 8, 20, ifd0 + 100, first0 - 10, first0 + 100, (first0 + last0) // 2, ifd1 + 50,
                       first1 + 10, len(data) - 1],
        flip_ranges=[(0, 8, 3), (ifd0, first0, 16), (first0, len(data), 5)],
    )

    # The bundled H&E JPEG.
    data = sample_path("hgsc_nest").read_bytes()
    kinds = [("slide", "auto"), ("folder", "")]
    corpus.derive("jpg", data, ".jpg", kinds, magic=b"\xff\xd8\xff\xe0", rng=rng,
                  cuts=[2, 4, 20, 200, 700, 5000, len(data) // 2, len(data) - 2],
                  flip_ranges=[(0, 700, 10), (700, len(data), 4)])

    # A PNG written here from a crop of the JPEG.
    with Image.open(sample_path("hgsc_nest")) as im:
        im.crop((500, 500, 756, 756)).save(seeds / "crop.png")
    data = (seeds / "crop.png").read_bytes()
    corpus.derive("png", data, ".png", kinds, magic=b"\x89PNG\r\n\x1a\n", rng=rng,
                  cuts=[4, 8, 20, 33, 60, 200, len(data) // 2, len(data) - 6],
                  flip_ranges=[(0, 40, 6), (40, len(data), 6)])

    # Three bundled DICOM files: uncompressed multi-frame MR, RLE ultrasound, JPEG 2000 ultrasound.
    preamble = bytes(128) + b"DICM"
    for name in DICOM_SEEDS:
        data = (SAMPLES_DIR / "dicom" / name).read_bytes()
        pixel_start = data.rfind(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) Pixel Data element
        corpus.derive(name.split(".")[0], data, ".dcm", [("dicom", "")], magic=preamble, rng=rng,
                      cuts=[64, 132, 140, 300, pixel_start - 4, pixel_start + 20, (pixel_start + len(data)) // 2],
                      flip_ranges=[(132, pixel_start, 7), (pixel_start, len(data), 3)])

    _hostile(corpus, seeds)
    return corpus.cases


# ------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory) -> dict:
    """Build the corpus, run it in a child process, and collect every case's outcome."""
    root = tmp_path_factory.mktemp("fuzz")
    cases = build_corpus(root / "corpus")
    (root / "cases.json").write_text(json.dumps(cases))
    results = root / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, str(root / "cases.json"), str(results)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env)
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        returncode, stderr = None, e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    lines = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    started = [x["start"] for x in lines if "start" in x]
    outcomes = {x["case"]: x for x in lines if "case" in x}
    shutil.rmtree(root / "corpus")
    return {"cases": cases, "outcomes": outcomes, "returncode": returncode, "stderr": stderr,
            "last_started": started[-1] if started else None}


def test_child_neither_crashed_nor_hung(fuzz_run) -> None:
    rc, last = fuzz_run["returncode"], fuzz_run["last_started"]
    assert rc is not None, f"the fuzz child ran past {CHILD_TIMEOUT_S} s; last case started: {last}"
    assert rc == 0, (
        f"the fuzz child died with exit code {rc} (negative = killed by that signal, 1 = faulthandler's "
        f"per-case timeout); last case started: {last}\n{fuzz_run['stderr'][-3000:]}"
    )
    assert len(fuzz_run["outcomes"]) == len(fuzz_run["cases"])
    assert 150 <= len(fuzz_run["cases"]) <= 400


@pytest.mark.parametrize("seed", ["svs", "tif", "jpg", "png", *[n.split(".")[0] for n in DICOM_SEEDS], "hostile"])
def test_every_case_succeeds_or_says_one_clear_sentence(fuzz_run, seed: str) -> None:
    cases = [c for c in fuzz_run["cases"] if c["seed"] == seed]
    assert cases
    bad = []
    for case in cases:
        result = fuzz_run["outcomes"].get(case["name"])
        if result is None:
            bad.append(f"{case['name']}: never finished (see test_child_neither_crashed_nor_hung)")
            continue
        message = result["message"]
        if result["outcome"] == "ok":
            continue
        file_name = Path(case["path"]).name
        if result["outcome"] != "HistofmError":
            bad.append(f"{case['name']}: {message}")
        elif file_name not in message or "\n" in message or not message.endswith(".") or len(message) > 400:
            bad.append(f"{case['name']}: not one sentence naming {file_name}: {message!r}")
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(bad[:30])


def test_corpus_reaches_both_outcomes(fuzz_run) -> None:
    """Not trivially all-broken: flipped pixel bytes decode; random bytes, short cuts and hostile headers fail."""
    outcomes = {c["name"]: (c, fuzz_run["outcomes"].get(c["name"], {}).get("outcome")) for c in fuzz_run["cases"]}
    for seed in ("svs", "tif", "jpg", "png", *[n.split(".")[0] for n in DICOM_SEEDS]):
        kinds = {outcome for case, outcome in outcomes.values() if case["seed"] == seed}
        assert {"ok", "HistofmError"} <= kinds, (seed, kinds)
    for name, (case, outcome) in outcomes.items():
        label = name.split("-", 1)[1]
        must_fail = (case["seed"] == "hostile" or label.startswith(("random", "magic-random"))
                     or (label.startswith("cut") and int(label[3:].split("[")[0]) <= 20))
        if must_fail:
            assert outcome == "HistofmError", f"{name} ended in {outcome}"


def _extract(slides: list[Path], out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "histofm", "extract", *map(str, slides), "--model", "vit_tiny_patch16_224",
           "--random-init", "--layout", "flat", "--out", str(out), "--tile-size", "112", "--target-mpp", "0.5", "--batch-size", "4", "--workers", "0",
           "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


def test_extract_cli_on_fuzzed_slides(tmp_path) -> None:
    """`histofm extract` on damaged slides: exit 2, one `histofm: error:` line each, no traceback, no partial file."""
    import tifffile

    good = tmp_path / "good.tif"
    _small_pyramid(good)
    # Level-0 tiles of the bottom row zeroed: opening and tissue detection (level 1) work, and the
    # failure comes while tiles are being embedded, after the first batches.
    with tifffile.TiffFile(good) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    data = bytearray(good.read_bytes())
    for i in range(len(offsets) - 3, len(offsets)):
        data[offsets[i]:offsets[i] + counts[i]] = bytes(counts[i])
    (tmp_path / "late.tif").write_bytes(bytes(data))
    svs = sample_path("cmu_small_region")
    (tmp_path / "cut.svs").write_bytes(svs.read_bytes()[:_tiff_layout(svs)[0][0] + 60])  # inside the first IFD
    (tmp_path / "noise.svs").write_bytes(b"II*\x00" + random.Random(3).randbytes(3000))
    bad = ["late.tif", "cut.svs", "noise.svs"]
    out = tmp_path / "out"
    proc = _extract([good, *(tmp_path / b for b in bad)], out)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == len(bad), proc.stderr
    for name, line in zip(bad, lines):
        assert line.startswith(f"histofm: error: {name}: ") and line.endswith("."), line
        assert "truncated or corrupt" in line, line
    assert lines[0].startswith("histofm: error: late.tif: Reading late.tif at ("), lines[0]  # failed mid-slide
    # Only the good slide's features; nothing half-written (temp files included) for the bad ones.
    assert sorted(f.name for f in out.iterdir()) == ["good.h5"]


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
