"""Slide embeddings from feature files (``histofm slide-embed``) and the linear probe on them."""

from __future__ import annotations

import csv
import json
import stat

import h5py
import numpy as np
import pytest
import torch

from histofm.cli import main
from histofm.errors import HistofmError
from histofm.eval.slide_probe import probe_slide_embeddings, slide_probe_cv
from histofm.registry import create_slide_encoder
from histofm.wsi.slide_embed import (
    embed_slide_file,
    read_slide_embeddings,
    slide_embedding_dir,
    write_slide_embedding,
)

TINY = dict(in_chans=16, embed_dim=32, depth=1, num_heads=4, segment_lengths=[16, 64], dilations=[1, 2])


def _write_features(path, feats, coords, model_name="prov_gigapath", step=512, with_step=True) -> None:
    """A feature file in the layout of ``histofm extract`` (level-0 coords, TRIDENT attributes)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float32))
        d = f.create_dataset("coords", data=coords.astype(np.int64))
        if with_step:
            d.attrs["patch_size_level0"] = step
        f.attrs["model_name"] = model_name
        f.attrs["mpp"] = 0.5


def _bag(rng: np.random.Generator, n: int, signal: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    cells = rng.choice(400, size=n, replace=False)
    coords = np.stack([cells // 20, cells % 20], 1) * 512 + 2048  # level-0 px, 512-px steps
    feats = rng.normal(size=(n, 16))
    if signal is not None:  # a third of the tiles carry the class signal
        hit = rng.random(n) < 1 / 3
        feats[hit] += signal
    return feats, coords


def test_embed_slide_file_is_the_model_on_the_file(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_slide_encoder("prov_gigapath_slide", **TINY).eval()
    rng = np.random.default_rng(0)
    feats, coords = _bag(rng, 25, None)
    _write_features(tmp_path / "s1.h5", feats, coords)
    emb = embed_slide_file(tmp_path / "s1.h5", model)
    with torch.no_grad():
        direct = model(torch.from_numpy(feats).float()[None], torch.from_numpy(coords).double()[None], tile_size=512)
    np.testing.assert_allclose(emb, direct[0].numpy(), atol=1e-6)
    # without patch_size_level0 the step is inferred from the coordinate gaps (512 here)
    _write_features(tmp_path / "s2.h5", feats, coords, with_step=False)
    np.testing.assert_allclose(embed_slide_file(tmp_path / "s2.h5", model), emb, atol=1e-6)

    out = slide_embedding_dir(tmp_path, "prov_gigapath_slide")
    path = write_slide_embedding(out, "s1", emb, slide_encoder="prov_gigapath_slide", source=tmp_path / "s1.h5",
                                 attrs={"num_tiles": 25})
    assert path == tmp_path / "slide_embeddings_prov_gigapath_slide" / "s1.h5"
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others, not a 0600 temp file
    names, X, attrs = read_slide_embeddings(out)
    assert names == ["s1"] and X.shape == (1, 32)
    np.testing.assert_array_equal(X[0], emb)
    assert attrs["slide_encoder"] == "prov_gigapath_slide" and attrs["source"] == "s1.h5" and attrs["num_tiles"] == 25
    assert not list(out.glob(".*.tmp"))


def test_wrong_features_name_the_cause(tmp_path) -> None:
    model = create_slide_encoder("prov_gigapath_slide", **TINY)
    rng = np.random.default_rng(1)
    feats, coords = _bag(rng, 10, None)
    _write_features(tmp_path / "uni.h5", feats, coords, model_name="uni")
    with pytest.raises(HistofmError, match="holds uni tile features.*--model prov_gigapath.*--any-tile-encoder"):
        embed_slide_file(tmp_path / "uni.h5", model)
    assert embed_slide_file(tmp_path / "uni.h5", model, any_tile_encoder=True).shape == (32,)
    _write_features(tmp_path / "wide.h5", np.zeros((10, 20)) + 1, coords)
    with pytest.raises(HistofmError, match="20-d tile features but the slide encoder reads 16-d"):
        embed_slide_file(tmp_path / "wide.h5", model)
    with pytest.raises(HistofmError, match="No slide embeddings"):
        read_slide_embeddings(tmp_path / "nothing")


def test_cli_and_probe_recover_a_planted_signal(tmp_path, capsys) -> None:
    rng = np.random.default_rng(2)
    feat_dir = tmp_path / "features"
    feat_dir.mkdir()
    signal = 1.5 * rng.normal(size=16)
    rows = []
    for i in range(40):
        label = i % 2
        feats, coords = _bag(rng, int(rng.integers(15, 40)), signal if label else None)
        _write_features(feat_dir / f"slide{i:02d}.h5", feats, coords)
        rows.append((f"slide{i:02d}", "tumour" if label else "normal", f"p{i // 2}"))  # two slides per patient
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label", "patient_id"), *rows])

    args = ["slide-embed", "--slide-encoder", "prov_gigapath_slide", str(feat_dir), "--device", "cpu", "--no-progress"]
    assert main(args) == 2  # no weights named
    assert "needs weights: pass --checkpoint PATH or --pretrained" in capsys.readouterr().err
    assert main(["slide-embed", "--slide-encoder", "titan", str(tmp_path / "nope"), "--random-init"]) == 2
    assert "Feature folder not found" in capsys.readouterr().err
    assert main(["slide-embed", "--slide-encoder", "gigapath", str(feat_dir), "--random-init"]) == 2
    err = capsys.readouterr().err
    assert "Unknown slide encoder 'gigapath'" in err and err.count("\n") == 1
    torch.manual_seed(0)
    tiny = ["--set", "in_chans=16", "--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=4",
            "--set", "global_pool=true", "--random-init"]
    assert main(args + tiny) == 0
    out = slide_embedding_dir(feat_dir, "prov_gigapath_slide")
    assert len(list(out.glob("*.h5"))) == 40
    assert main(args + tiny) == 0 and "0 slide embeddings written" in capsys.readouterr().out  # resumes

    # the probe through the command line: `histofm mil train --slide-embeddings`
    assert main(["mil", "train", "--slide-embeddings", str(out), "--labels", str(labels), "--folds", "4",
                 "--out", str(tmp_path / "probe")]) == 0
    assert "balanced_accuracy" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    result = probe_slide_embeddings(out, labels, None, folds=4, n_boot=20)
    bacc = result.pooled["balanced_accuracy"].mean
    assert metrics["pooled"]["balanced_accuracy"]["mean"] == pytest.approx(bacc)  # same folds, same fit
    assert bacc >= 0.85, bacc
    assert result.pooled["auroc"].mean >= 0.9
    assert metrics["n_slides"] == 40 and metrics["classes"] == ["normal", "tumour"]
    with open(tmp_path / "probe" / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 40 and {p["fold"] for p in preds} == {"0", "1", "2", "3"}
    for pid in {p["patient_id"] for p in preds}:  # a patient's slides are tested in one fold
        assert len({p["fold"] for p in preds if p["patient_id"] == pid}) == 1

    # control: the same embeddings with shuffled labels are at chance
    names, X, _ = read_slide_embeddings(out)
    y = np.array([int(r[1] == "tumour") for r in rows])
    shuffled = slide_probe_cv(X, np.random.default_rng(3).permutation(y), folds=4, n_boot=0)
    assert shuffled.pooled["balanced_accuracy"].mean < bacc - 0.2


def test_probe_names_missing_slides(tmp_path) -> None:
    out = tmp_path / "emb"
    for i in range(4):
        write_slide_embedding(out, f"s{i}", np.ones(3) * i, slide_encoder="x")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns0,a\ns1,b\ns9,a\n")
    with pytest.raises(HistofmError, match="1 labelled slides have no embedding .*s9"):
        probe_slide_embeddings(out, labels)
