"""Property-based fuzz of ``histofm pretrain`` and ``histofm semi`` settings (hypothesis).

Over every config key of every method (its config fields, nested ``view.*`` / ``augment.*``
fields, ``TrainConfig`` and ``backbone.*``), random values and random unknown keys:

* no traceback ever: ``histofm.cli.main`` returns 0 or 2 (argparse: exits 2);
* every refusal is one sentence on stderr (``histofm: error: ... .``);
* values that are wrong by their annotated type alone (a fraction for an ``int``, text for a
  number, ``nan``/``inf`` for a ``float``, an unknown key) are always refused;
* a value ``--check`` accepts then trains one step without a traceback, and an exit 0 leaves
  a finite backbone; a refusal writes no backbone;
* no file outside ``--out`` is created or removed.

CI runs a bounded number of examples; ``HISTOFM_FUZZ_EXAMPLES=2000`` runs a longer fuzz.
"""

from __future__ import annotations

import json
import math
import os
import typing
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from histofm.methods.backbone_settings import backbone_declarations
from histofm.methods.registry import list_methods, method_config_class
from histofm.settings import declared_fields
from histofm.train.config import TrainConfig
from test_settings import one_sentence, pretrain_argv, run_cli

EXAMPLES = int(os.environ.get("HISTOFM_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=EXAMPLES == 0, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _keys(method: str) -> list[tuple[str, Any]]:
    """``(key as typed with --set, annotated type)`` for every setting ``method`` takes."""
    out: list[tuple[str, Any]] = []
    for name, (tp, rule) in declared_fields(method_config_class(method)).items():
        out.append((name, tp))
        if rule.of is not None:
            out += [(f"{name}.{sub}", t) for sub, (t, _) in declared_fields(rule.of).items()]
    out += [(name, tp) for name, (tp, _) in declared_fields(TrainConfig).items() if name != "out_dir"]
    out += [(f"backbone.{name}", tp) for name, (tp, _) in backbone_declarations().items()]
    return out


KEYS = {m: _keys(m) for m in list_methods()}
RAW = ["x", "nan", "inf", "-inf", "-1", "0", "1", "1.5", "1e-3", "[1,2]", "{a: 1}", "true", "null", "", "2,3",
       "[0.1, 0.2]", "1e400", "-0", "0x10", "'3'", "{", "\x00", "é"]
VALUES = st.one_of(
    st.sampled_from(RAW),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
KEY_TEXT = st.one_of(st.text("abcxyz_.", min_size=1, max_size=8), st.text(min_size=1, max_size=4).filter(
    lambda k: "=" not in k))


def _number(raw: str) -> float | None:
    import yaml

    from histofm.settings import parse_value

    try:
        v = parse_value(raw)
    except (ValueError, yaml.YAMLError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def wrong_by_type(tp: Any, raw: str) -> bool:  # noqa: ANN401
    """True when ``raw`` cannot be a value of annotation ``tp`` whatever the range (an oracle that does not
    read the ranges under test)."""
    args = typing.get_args(tp)
    if tp is int:
        v = _number(raw)
        return v is None or not math.isfinite(v) or not float(v).is_integer()
    if tp is float:
        v = _number(raw)
        return v is None or not math.isfinite(v)
    if type(None) in args or tp in (str, bool, Any) or typing.get_origin(tp) is not None:
        return False
    return False


def _snapshot(root: Path, out: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if out not in p.parents and p != out}


@fuzz_settings(EXAMPLES or 60)
@given(data=st.data())
def test_pretrain_check_never_tracebacks(tmp_path_factory, capsys, data) -> None:
    method = data.draw(st.sampled_from(list_methods()), label="method")
    key, tp = data.draw(st.one_of(st.sampled_from(KEYS[method]),
                                  KEY_TEXT.map(lambda k: (k, None))), label="key")
    raw = data.draw(VALUES, label="value")
    via_config = data.draw(st.booleans(), label="via --config") and "." not in key
    root = tmp_path_factory.mktemp("fuzz")
    out = root / "out"
    if via_config:  # the same setting as a line of a YAML file (random text may make it invalid YAML)
        (root / "run.yaml").write_bytes(f"{key}: {raw}\n".encode("utf-8", "surrogatepass"))
        extra = ["--config", str(root / "run.yaml")]
    else:
        extra = [f"--set={key}={raw}"]  # `=`: a key may start with -
    before = _snapshot(root, out)
    rc, _, err = run_cli(pretrain_argv(method, out, *extra), capsys)
    assert rc in (0, 2), err
    event(f"exit {rc}")
    if rc == 2:
        one_sentence(err)
        assert "Traceback" not in err
    unknown = tp is None and not any(k == key for k, _ in KEYS[method])
    if not via_config and (unknown or (tp is not None and wrong_by_type(tp, raw))):
        assert rc == 2, f"{method} --set {key}={raw!r} was accepted"
    assert _snapshot(root, out) == before and not out.exists()  # --check writes nothing anywhere


# Small values a one-step run can afford (a huge head or crop count is a memory check's job, not this test's).
SMALL = st.one_of(st.integers(-2, 6).map(str), st.sampled_from(["0.5", "0.01", "1e-3", "true", "false", "nan",
                                                                  "rrc", "ect", "batch", "null", "[0.2, 1.0]"]))
CHEAP_METHODS = ["simclr", "mocov2", "mocov3", "mae", "simmim", "dino"]


def typed_small(tp: Any) -> st.SearchStrategy[str]:  # noqa: ANN401
    """Mostly plausible values for annotation ``tp`` (so that many examples get past --check), some random."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        plausible = st.sampled_from([str(a) for a in args])
    elif tp is bool:
        plausible = st.sampled_from(["true", "false"])
    elif tp is int or int in args:
        plausible = st.integers(0, 4).map(str)
    elif tp is float or float in args:
        plausible = st.sampled_from(["0", "0.05", "0.3", "0.5", "0.9", "1", "2", "1e-30", "1e30"])
    elif typing.get_origin(tp) is tuple:
        plausible = st.sampled_from(["[0.2, 1.0]", "[0.5, 0.5]", "[1, 2]"])
    else:
        plausible = SMALL
    return st.one_of(plausible, plausible, plausible, SMALL)


@fuzz_settings(max(EXAMPLES // 10, 6) if EXAMPLES else 6)
@given(data=st.data())
def test_accepted_settings_train_without_traceback_or_nan(tmp_path_factory, capsys, data) -> None:
    method = data.draw(st.sampled_from(CHEAP_METHODS), label="method")
    small_keys = [(k, t) for k, t in KEYS[method] if not k.startswith(("backbone.", "device", "num_workers", "steps",
                                                                       "batch_size", "parallel", "compile", "resume",
                                                                       "stop_after", "tensorboard"))]
    key, tp = data.draw(st.sampled_from(small_keys), label="key")
    raw = data.draw(typed_small(tp), label="value")
    root = tmp_path_factory.mktemp("fuzzrun")
    out = root / "out"
    base = ["--set", "monitor_every=0", "--set", "tensorboard=false", "--set", "proj_hidden_dim=16"] \
        if method in ("simclr", "mocov2", "mocov3") else []
    if method in ("mae", "simmim", "dino"):
        base = ["--set", "preset=cpu_small"] if method != "dino" else ["--set", "out_dim=64", "--set", "hidden_dim=16",
                                                                       "--set", "bottleneck_dim=8", "--set", "n_local_crops=1"]
        base += ["--set", "monitor_every=0", "--set", "tensorboard=false"]
    extra = [*base, "--set", f"{key}={raw}"]
    rc, _, err = run_cli(pretrain_argv(method, out, *extra), capsys)
    assert rc in (0, 2)
    if rc != 0:
        event("refused by --check")
        return
    before = _snapshot(root, out)
    rc, _, err = run_cli(pretrain_argv(method, out, *extra, check=False), capsys)
    assert rc in (0, 2), err
    assert _snapshot(root, out) == before
    weights = out / "backbone.safetensors"
    if rc == 2:
        one_sentence(err)
        event("accepted by --check, refused at run time")
        if "not finite" in err and "any of" in err:
            assert not weights.exists()
        return
    event("trained one step")
    from safetensors.torch import load_file

    assert all(bool(torch.isfinite(v).all()) for v in load_file(weights).values() if v.is_floating_point())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r["loss"]) for r in log)


SEMI_FLAGS = {"--steps": int, "--batch-size": int, "--mu": int, "--lr": float, "--width": int, "--img-size": int,
              "--threshold": float, "--seed": int}


@fuzz_settings(EXAMPLES or 40)
@given(data=st.data())
def test_semi_check_never_tracebacks(tmp_path_factory, capsys, data) -> None:
    flag = data.draw(st.sampled_from([*SEMI_FLAGS, "--device", "--method"]), label="flag")
    raw = data.draw(VALUES, label="value")
    root = tmp_path_factory.mktemp("semifuzz")
    (root / "tiles").mkdir()
    (root / "labels.csv").write_text("path,label\n")
    out = root / "out"
    before = _snapshot(root, out)
    argv = ["semi", "--data", str(root / "tiles"), "--labels", str(root / "labels.csv"), "--out", str(out),
            "--check", f"{flag}={raw}"]
    rc, _, err = run_cli(argv, capsys)
    assert rc in (0, 2), err
    assert "Traceback" not in err
    if rc == 2:
        assert "error:" in err.strip().splitlines()[-1]
    tp = SEMI_FLAGS.get(flag)
    if tp is float and (_number(raw) is None or not math.isfinite(_number(raw) or 0.0)):
        assert rc == 2
    if flag == "--lr" and rc == 0:
        assert (_number(raw) or 0) > 0
    assert _snapshot(root, out) == before and not out.exists()
