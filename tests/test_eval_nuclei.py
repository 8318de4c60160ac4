"""The nucleus-type task on the bundled HGSC field, end to end through `histofm eval nuclei`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import histofm
from histofm.cli import main
from histofm.data import sample_path
from histofm.eval.nuclei import (
    colour_histogram,
    evaluate_features,
    evaluate_features_shifted,
    load_nuclei_task,
    shifted_test_crops,
)

TINY = ["--set", "depth=1", "--set", "embed_dim=48", "--set", "num_heads=2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def task():
    return load_nuclei_task(48)


def test_task_construction(task) -> None:
    inst = np.load(sample_path("hgsc_nest_inst_mask"))["nuc_raster"]
    assert len(task.labels) == len(np.unique(inst)) - 1 == 1294
    assert int(task.train.sum()) == 686 and int((~task.train).sum()) == 608  # the split of BASELINES.md
    assert task.crops.shape == (1294, 48, 48, 3) and task.crops.dtype == np.uint8
    blocks = (task.centers // 500).astype(int)
    assert np.array_equal(task.train, blocks.sum(1) % 2 == 0)
    image = np.asarray(Image.open(sample_path("hgsc_nest")).convert("RGB"))
    types = np.load(sample_path("hgsc_nest_type_mask"))["nuc_raster"]
    for i in (0, 100, 700, 1293):  # crops are centred on the nucleus and carry its type
        y, x = np.round(task.centers[i]).astype(int)
        if 24 <= y < 1476 and 24 <= x < 1476:
            np.testing.assert_array_equal(task.crops[i], image[y - 24 : y + 24, x - 24 : x + 24])
        assert types[y, x] in (0, task.labels[i] + 1)
    assert set(np.unique(task.labels)) == {0, 1, 2}


def test_colour_histogram_matches_numpy(task) -> None:
    h = colour_histogram(task.crops[:5])
    for i in range(5):
        ref = [np.histogram(task.crops[i, ..., c], bins=8, range=(0, 256))[0] for c in range(3)]
        np.testing.assert_allclose(h[i], np.concatenate(ref) / (48 * 48))


def test_cli_prints_the_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    model = histofm.create_model("vit_tiny_patch8_224", depth=1, embed_dim=48, num_heads=2)
    save_file(model.state_dict(), str(ckpt))
    out = tmp_path / "nuclei.json"
    rc = main(["eval", "nuclei", "--model", "vit_tiny_patch8_224", *TINY, "--checkpoint", str(ckpt), "--seeds", "1",
               "--episodes", "10", "--bootstrap", "50", "--stain-shift", "hed-scale,macenko:cmu", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "colour histogram" in text and "random init" in text and "checkpoint" in text and "10-shot" in text
    assert "bal. acc. hed-scale" in text and "bal. acc. macenko:cmu" in text
    doc = json.loads(out.read_text())
    rows = {(r["features"], r["protocol"], r["shift"]): r for r in doc["results"]}
    assert len(rows) == 9 * 3 and doc["stain_shifts"] == ["hed-scale", "macenko:cmu"]
    hist_knn = rows[("colour histogram", "knn", "clean")]["balanced_accuracy"]
    assert hist_knn["mean"] > 0.6 and hist_knn["ci_low"] < hist_knn["mean"] < hist_knn["ci_high"]  # chance: 0.33
    # Colour features are what a re-staining breaks: the histogram's kNN falls under the Macenko shift.
    assert rows[("colour histogram", "knn", "macenko:cmu")]["balanced_accuracy"]["mean"] < hist_knn["mean"] - 0.1
    # The checkpoint holds the seed-0 random weights, so both rows must agree exactly.
    for protocol in ("knn", "linear", "10-shot"):
        for shift in ("clean", "hed-scale", "macenko:cmu"):
            a = rows[("vit_tiny_patch8_224 random init", protocol, shift)]
            b = rows[("vit_tiny_patch8_224 checkpoint", protocol, shift)]
            assert a["balanced_accuracy"] == b["balanced_accuracy"] and a["auroc"] == b["auroc"]


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "nuclei", "--model", "vit_tiny_patch8_224", "--random-init", "--crop", "4"]) == 2
    assert "--crop" in capsys.readouterr().err
    assert main(["eval", "nuclei", "--model", "vit_tiny_patch8_224"]) == 2  # no weights named: refused
    err = capsys.readouterr().err
    assert all(flag in err for flag in ("--checkpoint PATH", "--pretrained", "--random-init")), err
    assert main(["eval", "nuclei", "--model", "vit_tiny_patch8_224", "--checkpoint", str(tmp_path / "no.pt")]) == 2
    assert "Checkpoint not found" in capsys.readouterr().err
    assert main(["eval", "nuclei", "--model", "vit_tinny_patch8_224"]) == 2
    assert "Unknown model" in capsys.readouterr().err
    assert main(["eval", "nuclei", "--model", "vit_tiny_patch8_224", "--random-init", "--stain-shift", "hed-scale,purple"]) == 2
    assert "--stain-shift" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_shifted_evaluation_fits_on_the_original_stain_only(task) -> None:
    tr, te = task.train, ~task.train
    tests = shifted_test_crops(task.crops[te], ["hed-scale"])
    assert list(tests) == ["clean", "hed-scale"] and tests["hed-scale"].shape == tests["clean"].shape
    assert not np.array_equal(tests["hed-scale"], tests["clean"])
    x_train = colour_histogram(task.crops[tr])
    sets = {name: colour_histogram(c) for name, c in tests.items()}
    sets["copy"] = sets["clean"].copy()
    kw = {"seeds": 1, "episodes": 10, "n_boot": 50}
    shifted = evaluate_features_shifted(x_train, task.labels[tr], sets, task.labels[te], **kw)
    alone = evaluate_features(x_train, task.labels[tr], sets["clean"], task.labels[te], **kw)
    # The clean column is exactly the unshifted evaluation, and an identical test set scores identically:
    # one fit serves every column.
    for protocol, metrics in alone.items():
        assert shifted["clean"][protocol] == metrics == shifted["copy"][protocol], protocol
    # Fitted on the original stain, colour features lose accuracy on the shifted test crops.
    clean = shifted["clean"]["knn"]["balanced_accuracy"].mean
    assert shifted["hed-scale"]["knn"]["balanced_accuracy"].mean < clean - 0.02
