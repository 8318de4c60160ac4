"""Settings declared once and checked before any work: types, ranges, origins in messages, --config files.

Each bad value of issue 16 is fed to ``histofm pretrain --check`` (nothing is built, read or written) and
must end in exit 2 with one sentence naming the setting as typed; a run whose loss is never finite exports
nothing; a semi-supervised run with NaN weights saves nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import torch

from histofm.cli import main
from histofm.errors import HistofmError
from histofm.settings import (
    SettingError,
    check_config,
    coerce,
    load_config_file,
    parse_value,
    replace_config,
    setting,
)

# The tile-encoder flag of `histofm pretrain`; it becomes --model with the CLI vocabulary change.
ENCODER_FLAG = "--model"
TINY = {"depth": 1, "patch_size": 8, "embed_dim": 32, "num_heads": 2}


def pretrain_argv(method: str, out: object, *extra: str, check: bool = True) -> list[str]:
    """The one place tests spell a `histofm pretrain` command line."""
    argv = ["pretrain", "--method", method, ENCODER_FLAG, "pluto" if method == "pluto" else "vit_tiny_patch16_224",
            "--data", "bundled", "--out", str(out), "--img-size", "32", "--steps", "1", "--batch-size", "2",
            "--no-progress", "--device", "cpu"]
    for k, v in TINY.items():
        argv += ["--set", f"backbone.{k}={v}"]
    return [*argv, *extra, *(["--check"] if check else [])]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_sentence(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("histofm: note:")]
    assert len(lines) == 1 and lines[0].startswith("histofm: error: ") and lines[0].endswith("."), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- the declaration helper
@dataclasses.dataclass(frozen=True)
class _Cfg:
    n: int = setting(4, range=">= 1")
    p: float = setting(0.5, range="[0, 1]")
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    pair: tuple[float, float] = setting((0.2, 1.0), range="(0, 1]", ordered=True)
    width: int = setting(8, range=">= 1")
    heads: int = setting(2, range=">= 1", divides="width")
    maybe: float | None = setting(None, range="> 0")

    def __post_init__(self) -> None:
        check_config(self)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n": 1.5}, "n expects an integer, got 1.5"),
        ({"n": [1, 2]}, "n expects an integer"),
        ({"n": True}, "n expects an integer"),
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"p": float("nan")}, "p must be a finite number"),
        ({"p": "inf"}, "p must be a finite number"),
        ({"p": 2}, r"p must be in \[0, 1\], got 2"),
        ({"mode": "c"}, "mode must be one of 'a', 'b'"),
        ({"flag": "maybe"}, "flag expects true or false"),
        ({"pair": [0.5, 0.1]}, "increasing order"),
        ({"pair": [0.5]}, "list of 2 values"),
        ({"heads": 3}, "heads must divide width=8, got 3"),
        ({"maybe": 0}, "maybe must be > 0"),
        ({"nope": 1}, "Unknown option"),
    ],
)
def test_bad_values_name_the_key(changes, message) -> None:
    with pytest.raises(SettingError, match=message):
        replace_config(_Cfg(), changes)


def test_values_are_coerced_to_the_declared_type() -> None:
    cfg = replace_config(_Cfg(), {"n": "7", "p": "1e-3", "flag": "true", "pair": "0.1,0.9", "maybe": "none",
                                  "width": 1e3, "heads": 8})
    assert (cfg.n, cfg.p, cfg.flag, cfg.pair, cfg.maybe, cfg.width) == (7, 0.001, True, (0.1, 0.9), None, 1000)
    assert parse_value("1e-3") == 0.001 and parse_value("[1, 2]") == [1, 2] and parse_value("abc") == "abc"
    assert coerce(int, 2.0, "k") == 2
    with pytest.raises(SettingError):
        _Cfg(p=-0.1)  # direct construction is checked too


def test_config_files_binary_non_utf8_bom(tmp_path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (tmp_path / "latin1.yaml").write_bytes("lr: 0.1 # caf\xe9\n".encode("latin-1"))
    (tmp_path / "nul.yaml").write_bytes(b"lr: 0.1\x00\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfmethod: simclr\n")
    for name, msg in [("bin", "UTF-8"), ("latin1", "UTF-8"), ("nul", "binary"), ("list", "mapping"),
                      ("missing", "does not exist")]:
        with pytest.raises(HistofmError, match=msg):
            load_config_file(tmp_path / f"{name}.yaml")
    assert load_config_file(tmp_path / "bom.yaml") == {"method": "simclr"}
    assert load_config_file(tmp_path / "bom.yaml") is not None
    with pytest.raises(HistofmError, match="does not exist"):
        load_config_file(tmp_path)  # a folder


# --------------------------------------------------------------------------- the examples, via the CLI
@pytest.mark.parametrize(
    "method, extra, message",
    [
        ("simclr", ["--set", "augment=x"], "--set augment=x: augment must be one of 'sample', 'batch', got 'x'."),
        ("mocov2", ["--set", "version=5"], "--set version=5: version must be one of 2, 3"),
        ("dinov2", ["--set", "mlp_layer=foo"], "--set mlp_layer=foo: mlp_layer must be one of 'mlp', 'swiglu'"),
        ("simclr", ["--set", "temperature=0"], "--set temperature=0: temperature must be > 0, got 0."),
        ("mocov2", ["--set", "queue_size=0"], "--set queue_size=0: queue_size must be >= 1"),
        ("mae", ["--set", "decoder_dim=0"], "--set decoder_dim=0: decoder_dim must be >= 1"),
        ("simclr", ["--set", "log_every=0"], "--set log_every=0: log_every must be >= 1"),
        ("simclr", ["--set", "steps=1.5"], "--set steps=1.5: steps expects an integer, got 1.5."),
        ("simclr", ["--set", "batch_size=[1,2]"], "--set batch_size=[1,2]: batch_size expects an integer"),
        ("simclr", ["--set", "batch_size=4.5"], "batch_size expects an integer, got 4.5."),
        ("mae", ["--set", "decoder_heads=5"], "--set decoder_heads=5: decoder_heads must divide decoder_dim=512"),
        ("clip", ["--set", "text_heads=5"], "text_heads must divide text_width=512"),
        ("simclr", ["--set", "backbone.num_heads=3"], "not divisible by num_heads 3"),
        ("simclr", ["--set", "view.hed_p=2"], r"--set view.hed_p=2: view.hed_p must be in [0, 1], got 2."),
        ("dino", ["--set", "augment.hed_p=3"], "augment.hed_p must be in [0, 1]"),
        ("mocov3", ["--set", "momentum=2"], "--set momentum=2: momentum must be in [0, 1], got 2."),
        ("simclr", ["--set", "proj_dim=0"], "--set proj_dim=0: proj_dim must be >= 1"),
        ("simclr", ["--set", "backbone.depth=-1"], "--set backbone.depth=-1: backbone.depth must be in [1, 1024]"),
        ("simclr", ["--lr", "-1"], "--lr -1.0: lr must be >= 0"),
        ("simclr", ["--lr", "nan"], "--lr nan: lr must be a finite number"),
        ("simclr", ["--lr", "inf"], "--lr inf: lr must be a finite number"),
        ("simclr", ["--set", "max_nonfinite=0"], "--set max_nonfinite=0: max_nonfinite must be >= 1"),
        ("dino", ["--set", "student_temp=0"], "student_temp must be > 0"),
        ("simclr", ["--set", "temperature=nan"], "temperature must be a finite number"),
        ("simclr", ["--set", "view.nope=1"], "Unknown option(s) view.nope"),
        ("simclr", ["--set", "backbone.nope=1"], "backbone.nope is not an argument"),
        ("mae", ["--set", "preset=nope"], "unknown preset 'nope'"),
        ("simclr", ["--device", "nonsense"], "--device 'nonsense' is not a device"),
        ("simclr", ["--img-size", "0"], "--img-size 0: img_size must be in [8, 8192]"),
        ("simclr", ["--batch-size", "1000000", "--img-size", "8192"], "lower the batch size or the image size"),
    ],
)
def test_pretrain_bad_settings_one_sentence_before_work(tmp_path, capsys, method, extra, message) -> None:
    out = tmp_path / "run"
    rc, _, err = run_cli(pretrain_argv(method, out, *extra), capsys)
    assert rc == 2
    assert message in one_sentence(err)
    assert not out.exists()  # nothing written


def test_pretrain_config_file_errors_and_out_paths(tmp_path, capsys) -> None:
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    rc, _, err = run_cli(pretrain_argv("simclr", tmp_path / "r", "--config", str(tmp_path / "bin.yaml")), capsys)
    assert rc == 2 and "not UTF-8" in one_sentence(err)
    (tmp_path / "cfg.yaml").write_text("method_args: {temperature: -1}\n")
    rc, _, err = run_cli(pretrain_argv("simclr", tmp_path / "r", "--config", str(tmp_path / "cfg.yaml")), capsys)
    assert rc == 2 and f"--config {tmp_path / 'cfg.yaml'}: temperature must be > 0" in one_sentence(err)
    (tmp_path / "file").write_text("x")
    for out, msg in [(tmp_path / "file", "is an existing file"), (tmp_path / "file" / "sub", "lies under the file")]:
        rc, _, err = run_cli(pretrain_argv("simclr", out), capsys)
        assert rc == 2 and msg in one_sentence(err)
    rc, out_text, _ = run_cli(pretrain_argv("simclr", tmp_path / "ok"), capsys)
    assert rc == 0 and "settings OK" in out_text and not (tmp_path / "ok").exists()


def test_every_method_accepts_its_defaults_and_presets() -> None:
    from histofm.methods.registry import list_methods, method_config, method_presets

    for name in list_methods():
        method_config(name)
        for preset in method_presets(name):
            method_config(name, {"preset": preset})


# --------------------------------------------------------------------------- non-finite is an error
def test_loss_never_finite_exits_2_and_exports_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = pretrain_argv("simclr", out, "--set", "temperature=1e-300", "--set", "proj_hidden_dim=16",
                         "--set", "proj_dim=8", "--set", "monitor_every=0", "--set", "max_nonfinite=2",
                         "--steps", "3", check=False)
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2
    assert "not finite at any of the 2 steps" in one_sentence(err)
    assert "final loss" not in stdout
    assert not (out / "backbone.safetensors").exists() and not (out / "checkpoint.pt").exists()


def test_short_run_with_all_steps_non_finite_exports_nothing(tmp_path) -> None:
    from histofm.methods.base import SSLMethod
    from histofm.train import TrainConfig, fit

    class NaNMethod(SSLMethod):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(4, 2)

        def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": self.backbone(batch).sum() * float("nan")}

    cfg = TrainConfig(steps=2, batch_size=2, max_nonfinite=5, out_dir=str(tmp_path), progress=False,
                      monitor_every=0, tensorboard=False, device="cpu")
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(HistofmError, match="nothing exported"):
        fit(NaNMethod(), torch.randn(8, 4), cfg)
    assert not (tmp_path / "backbone.safetensors").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_semi_fit_refuses_nan_loss_and_nan_weights() -> None:
    from histofm.learning import build_semi_method
    from histofm.learning.semi import Classifier, SemiData, SmallConvNet
    from histofm.train.semi import fit_semi, semi_config

    g = torch.Generator().manual_seed(0)
    data = SemiData(torch.randint(0, 255, (4, 3, 16, 16), generator=g, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                    torch.randint(0, 255, (8, 3, 16, 16), generator=g, dtype=torch.uint8))
    method = build_semi_method("supervised", Classifier(SmallConvNet(4), 2))
    with torch.no_grad():
        next(method.deployed().parameters()).fill_(float("nan"))
    with pytest.raises(HistofmError, match="not finite|lower the learning rate"):
        fit_semi(method, data, semi_config(steps=1, batch_size=2, device="cpu"), mu=1, recalibrate_bn=False)
    with pytest.raises(SettingError, match="lr must be >= 0"):
        semi_config(lr=-1)


def test_semi_flags_checked_before_reading(tmp_path, capsys) -> None:
    (tmp_path / "tiles").mkdir()
    (tmp_path / "labels.csv").write_text("path,label\n")
    base = ["semi", "--data", str(tmp_path / "tiles"), "--labels", str(tmp_path / "labels.csv"),
            "--out", str(tmp_path / "out"), "--check"]
    for extra, msg in [(["--lr", "nan"], "--lr nan: lr must be a finite number"),
                       (["--lr", "-1"], "lr must be > 0"),
                       (["--mu", "100000"], "mu must be in [1, 1024]"),
                       (["--width", "0"], "--width 0: width must be in [1, 1024]"),
                       (["--img-size", "100000"], "img_size must be in [8, 4096]"),
                       (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device")]:
        rc, _, err = run_cli([*base, *extra], capsys)
        assert rc == 2 and msg in one_sentence(err), (extra, err)
    rc, out, _ = run_cli(base, capsys)
    assert rc == 0 and "settings OK" in out and not (tmp_path / "out").exists()


def test_eval_nuclei_flags_checked_before_work(tmp_path, capsys) -> None:
    base = ["eval", "nuclei", "--model", "vit_tiny_patch16_224"]
    for extra, msg in [(["--linear-c", "0"], "--linear-c 0.0: linear_c must be > 0"),
                       (["--linear-c", "nan"], "linear_c must be a finite number"),
                       (["--crop", "0"], "--crop 0: crop must be in [8, 1024]"),
                       (["--bootstrap", "-1"], "bootstrap must be in [0, 1000000]"),
                       (["--json", str(tmp_path)], "is a folder"),
                       (["--device", "nonsense"], "not a device")]:
        rc, _, err = run_cli([*base, *extra], capsys)
        assert rc == 2 and msg in one_sentence(err), (extra, err)


def test_pretrain_memory_of_activations_and_tiles_checked(tmp_path, capsys) -> None:
    rc, _, err = run_cli(pretrain_argv("simclr", tmp_path / "r", "--img-size", "8192", "--set", "backbone.depth=12",
                                       "--set", "backbone.embed_dim=192"), capsys)
    assert rc == 2 and "GiB of activations per step" in one_sentence(err)
    rc, _, err = run_cli(pretrain_argv("simclr", tmp_path / "r", "--tile-size", "65536"), capsys)
    assert rc == 2 and "--tile-size 65536 needs" in one_sentence(err)


def test_pretrain_sizes_must_be_whole_patches(tmp_path, capsys) -> None:
    for method, extra, msg in [("simclr", ["--img-size", "36"], "--img-size 36: img_size=36 is not a multiple"),
                               ("simclr", ["--set", "view.size=2"], "--set view.size=2: view.size=2 is not a multiple"),
                               ("dino", ["--set", "augment.local_size=12"], "augment.local_size=12 is not a multiple")]:
        rc, _, err = run_cli(pretrain_argv(method, tmp_path / "r", *extra), capsys)
        assert rc == 2 and msg in one_sentence(err), err
