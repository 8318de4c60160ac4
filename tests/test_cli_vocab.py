"""Old spellings keep working as hidden aliases with one notice; ``--set`` parses one way; errors speak each
command's own flags."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import tifffile
from PIL import Image

from histofm.cli import build_parser, main
from histofm.commands._vocab import parse_set
from histofm.commands.pretrain import resolve_settings
from histofm.data import sample_path
from histofm.data.datasets import tile_dataset
from histofm.errors import HistofmError

PRETRAIN = ["pretrain", "--method", "simclr", "--data", "bundled", "--out", "run"]


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize(
    "argv, old, dest, value",
    [
        ([*PRETRAIN, "--arch", "vit_tiny_patch16_224"], "--arch", "model", "vit_tiny_patch16_224"),
        (["semi", "--data", "d", "--labels", "l.csv", "--out", "o", "--arch", "vit_tiny_patch16_224"], "--arch",
         "model", "vit_tiny_patch16_224"),
        (["eval", "nuclei", "--model", "m", "--option", "depth=1", "--option", "embed_dim=48"], "--option", "set",
         ["depth=1", "embed_dim=48"]),
    ],
)
def test_old_spelling_is_a_hidden_alias_with_one_notice(argv, old, dest, value, capsys) -> None:
    args = _parse(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{old} is deprecated" in err  # once, even when repeated
    new = {"model": "--model", "set": "--set"}[dest]
    assert f"use {new}" in err
    # The new spelling says nothing and gives the same result; the old one is not in --help.
    args_new = _parse([new if a == old else a for a in argv])
    assert getattr(args_new, dest) == value and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        main([*argv[: 2 if argv[0] == "eval" else 1], "--help"])
    assert old not in capsys.readouterr().out


def test_mixing_old_and_new_spellings_appends_to_one_list(capsys) -> None:
    args = _parse(["eval", "nuclei", "--model", "m", "--set", "depth=1", "--option", "embed_dim=48"])
    assert args.set == ["depth=1", "embed_dim=48"]
    assert "--option is deprecated" in capsys.readouterr().err


def test_the_default_of_a_new_flag_survives_its_unused_alias() -> None:
    args = _parse(["eval", "nuclei", "--model", "m"])
    assert args.set == [] and not hasattr(args, "option")
    assert _parse(["semi", "--data", "d", "--labels", "l", "--out", "o"]).model == "small_cnn"


def test_pretrain_settings_accept_the_old_arch_key_from_yaml_and_set(tmp_path, capsys) -> None:
    (tmp_path / "run.yaml").write_text("method: simclr\narch: vit_tiny_patch16_224\ndata: bundled\nout: o\n")
    s = resolve_settings(_parse(["pretrain", "--config", str(tmp_path / "run.yaml")]))
    assert s["model"] == "vit_tiny_patch16_224" and "arch" not in s
    assert "'arch' in" in capsys.readouterr().err
    s = resolve_settings(_parse([*PRETRAIN, "--set", "arch=vit_tiny_patch8_224"]))
    assert s["model"] == "vit_tiny_patch8_224"
    assert "use 'model'" in capsys.readouterr().err


def test_pretrain_without_a_model_names_the_new_flag(capsys) -> None:
    assert main(PRETRAIN) == 2
    err = capsys.readouterr().err
    assert "Missing --model" in err and "--arch" not in err


def test_parse_set_reads_values_as_yaml() -> None:
    assert parse_set(["depth=4", "gated=false", "lr=1e-3", "name=abc", "dims=[1, 2]", "x="]) == {
        "depth": 4, "gated": False, "lr": 1e-3, "name": "abc", "dims": [1, 2], "x": None,
    }
    assert parse_set(["key = 2"]) == {"key": 2}
    for bad in ("depth", "=4"):
        with pytest.raises(HistofmError, match=r"--set .* is not KEY=VALUE"):
            parse_set([bad])


def test_eval_set_reaches_the_encoder_and_a_bad_item_names_set(capsys) -> None:
    assert main(["eval", "nuclei", "--model", "vit_tiny_patch8_224", "--set", "depth"]) == 2
    err = capsys.readouterr().err
    assert "--set 'depth' is not KEY=VALUE" in err and err.count("\n") == 1


def test_semi_checkpoint_without_a_registered_model_names_model(tmp_path, capsys) -> None:
    from histofm.commands.semi import build_classifier

    with pytest.raises(HistofmError, match="pass --model NAME"):
        build_classifier("small_cnn", 3, 32, checkpoint=tmp_path / "w.safetensors")


def test_pretrain_mpp_override_reaches_slides_without_a_resolution(tmp_path) -> None:
    """A slide that records no resolution asks for --mpp-override, and pretrain now accepts that flag."""
    with Image.open(sample_path("hgsc_stroma")) as im:
        rgb = np.asarray(im.convert("RGB"))[:512, :512]
    slide = tmp_path / "no_mpp.tif"
    tifffile.imwrite(slide, rgb, photometric="rgb")  # no resolution tags
    with pytest.raises(HistofmError, match="--mpp-override"):
        tile_dataset(slide, tile_size=64, target_mpp=0.5)
    data = tile_dataset(slide, tile_size=64, target_mpp=0.5, mpp=0.5)
    assert len(data) > 0 and data[0].size == (64, 64)
    args = _parse([*PRETRAIN, "--model", "m", "--mpp-override", "0.25"])
    assert resolve_settings(args)["mpp_override"] == 0.25


def test_semi_set_overrides_a_registered_encoder_and_is_recorded(capsys) -> None:
    import torch

    from histofm.commands.semi import build_classifier

    tiny = {"depth": 1, "embed_dim": 48, "num_heads": 2, "img_size": 16}
    clf, record = build_classifier("vit_tiny_patch8_224", 3, 16, overrides=tiny)
    assert record == {"model": "vit_tiny_patch8_224", "overrides": tiny}
    assert len(clf.backbone.blocks) == 1 and clf(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(HistofmError, match="--set applies to registered models"):
        build_classifier("small_cnn", 3, 16, overrides={"depth": 1})
    args = _parse(["semi", "--data", "d", "--labels", "l", "--out", "o", "--set", "depth=1"])
    assert parse_set(args.set) == {"depth": 1}


@pytest.mark.parametrize("command", [
    [*PRETRAIN[:-2], "--model", "vit_tiny_patch16_224"],
    ["semi", "--data", "tiles", "--labels", "labels.csv"],
    ["demo", "--quick", "--no-progress"],
])
@pytest.mark.parametrize("below", [False, True])
def test_out_is_always_a_directory(command, below, tmp_path, capsys) -> None:
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    out = afile / "run" if below else afile
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}" in err and "choose another --out" in err  # the one message of histofm.checks.check_out_dir
    assert afile.read_text() == "not a folder"


@pytest.mark.parametrize("flag, value, message", [("--img-size", "4", "--img-size 4: img_size must be in [8, 4096]"),
                                                  ("--width", "0", "--width 0: width must be in [1, 1024]")])
def test_semi_size_errors_name_the_flag(flag, value, message, tmp_path, capsys) -> None:
    assert main(["semi", "--data", str(tmp_path), "--labels", "l.csv", "--out", str(tmp_path / "o"), flag, value]) == 2
    assert message in capsys.readouterr().err
