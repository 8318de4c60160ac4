"""``histofm extract --stain-norm``: every tile is normalised onto the target before encoding, and it shows."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from histofm.cli import main
from histofm.data import sample_path
from histofm.data.stain import normalizer, read_target
from histofm.wsi.features import ExtractConfig, extract_features, read_provenance
from test_wsi_layouts import SVS, Recorder

TARGET = sample_path("hgsc_stroma")


def _run(tmp_path, **stain) -> tuple[Recorder, np.ndarray]:
    rec = Recorder()
    cfg = ExtractConfig(target_mpp=1.0, tile_size=224, min_tissue=0.5, device="cpu", batch_size=8, **stain)
    report = extract_features([SVS], rec, tmp_path, config=cfg, progress=False)
    assert [r.status for r in report.results] == ["done"], report.results
    with h5py.File(report.results[0].output) as f:
        coords = f["coords"][:]
    return rec, coords


def test_tiles_are_normalised_onto_the_target_before_the_encoder(tmp_path) -> None:
    raw, xy_raw = _run(tmp_path / "raw")
    normed, xy = _run(tmp_path / "norm", stain_norm="macenko", stain_target=str(TARGET))
    np.testing.assert_array_equal(xy, xy_raw)  # same tiles
    expected = normalizer("macenko").fit(read_target(TARGET)).transform(raw.pixels())  # the raw tiles, normalised
    got = normed.pixels()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # one grey level: float round trip
    assert np.abs(got.astype(int) - raw.pixels().astype(int)).mean() > 5  # the stain really changed
    prov = read_provenance(tmp_path / "norm" / f"{SVS.stem}.h5")
    assert prov["preprocess_stain_norm"].startswith(f"macenko:{TARGET.name}@")  # method, target file and its hash
    assert read_provenance(tmp_path / "raw" / f"{SVS.stem}.h5")["preprocess_stain_norm"] == "none"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stain-norm", "macenko"], "--stain-norm and --stain-target go together"),
        (["--stain-norm", "macenko", "--stain-target", "nope.png"], "Stain target image not found"),
    ],
)
def test_stain_flags_bad_input(tmp_path, capsys, extra, message) -> None:
    rc = main(["extract", str(SVS), "--model", "vit_tiny_patch16_224", "--random-init", "--out", str(tmp_path / "o"),
               "--workers", "0", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_slide_encoder_embeds_each_extracted_slide(tmp_path, monkeypatch) -> None:
    """``extract --slide-encoder``: one slide embedding per feature file, equal to embedding the file afterwards."""
    import torch

    import histofm.registry
    from histofm.wsi.slide_embed import embed_slide_file, read_slide_embeddings

    real = histofm.registry.create_slide_encoder

    def tiny(name, **kw):  # the published width needs 1536-d tile features: a small one of the same design
        torch.manual_seed(0)
        enc = real("prov_gigapath_slide", in_chans=192, embed_dim=32, depth=1, num_heads=4, global_pool=True)
        enc.histofm_name = "tiny_slide_encoder"  # not registered: no tile-encoder pairing to check
        return enc

    monkeypatch.setattr(histofm.registry, "create_slide_encoder", tiny)
    out = tmp_path / "o"
    rc = main(["extract", str(SVS), "--model", "vit_tiny_patch16_224", "--random-init", "--out", str(out),
               "--workers", "0", "--no-progress", "--device", "cpu",
               "--slide-encoder", "prov_gigapath_slide", "--slide-random-init"])
    assert rc == 0
    feats = out / "features_vit_tiny_patch16_224" / f"{SVS.stem}.h5"
    names, emb, _ = read_slide_embeddings(feats.parent / "slide_embeddings_prov_gigapath_slide")
    assert names == [SVS.stem] and emb.shape == (1, 32) and np.isfinite(emb).all()
    again = embed_slide_file(feats, tiny("x"), device="cpu")
    np.testing.assert_allclose(emb[0], again, atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--slide-encoder", "prov_gigapath_slide"], "needs exactly one of --slide-checkpoint PATH"),
        (["--slide-pretrained"], "--slide-pretrained needs --slide-encoder NAME"),
        (["--slide-encoder", "nope", "--slide-random-init"], "nope"),
    ],
)
def test_slide_encoder_flags_bad_input(tmp_path, capsys, extra, message) -> None:
    rc = main(["extract", str(SVS), "--model", "vit_tiny_patch16_224", "--random-init", "--out", str(tmp_path / "o"),
               "--workers", "0", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
