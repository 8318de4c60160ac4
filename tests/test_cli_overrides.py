"""Encoder ``--set`` overrides of ``eval nuclei`` and ``semi`` are checked before any work: one sentence, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from histofm.cli import main


@pytest.mark.parametrize(("value", "message"), [
    ("patch_size=abc", "--set patch_size=abc: patch_size expects an integer, got 'abc'."),
    ("img_size=0", "--set img_size=0: img_size must be in [1, 16384], got 0."),
    ("mlp_ratio=abc", "--set mlp_ratio=abc: mlp_ratio expects a float"),
    ("foo=1", "--set foo=1: foo is not an argument of the backbone vit_tiny_patch8_224"),
])
def test_eval_nuclei_and_semi_refuse_bad_encoder_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          value: str, message: str) -> None:
    code = main(["eval", "nuclei", "--model", "vit_tiny_patch8_224", "--random-init", "--set", value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err  # was a ValueError/RuntimeError traceback
    (tmp_path / "tiles").mkdir()
    (tmp_path / "labels.csv").write_text("path,label\n")
    code = main(["semi", "--data", str(tmp_path / "tiles"), "--labels", str(tmp_path / "labels.csv"), "--out",
                 str(tmp_path / "run"), "--model", "vit_tiny_patch8_224", "--check", "--set", value])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_eval_nuclei_names_the_flags_a_histofm_checkpoint_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import histofm
    from histofm.train.checkpoint import export_backbone

    model = histofm.create_model("vit_tiny_patch8_224", img_size=32, depth=1, drop_path_rate=0.1)
    weights = export_backbone(model, tmp_path)  # backbone.safetensors + backbone.json, as `histofm pretrain` writes
    base = ["eval", "nuclei", "--model", "vit_tiny_patch8_224", "--checkpoint", str(weights)]
    assert main(base) == 2
    err = capsys.readouterr().err
    # It was a list of 120 missing keys and shape mismatches; dropout need not be repeated.
    assert "pass --model vit_tiny_patch8_224 --set img_size=32 --set depth=1." in err, err
    assert main(["eval", "nuclei", "--model", "vit_small_patch16_224", "--checkpoint", str(weights),
                 "--set", "img_size=32", "--set", "depth=1"]) == 2
    assert "written for vit_tiny_patch8_224" in capsys.readouterr().err
