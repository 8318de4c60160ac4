"""The one declaration of every ``mil train --set`` key: its type and range, checked before any work.

Each aggregator's constructor options and each training setting of
:class:`~histofm.mil.train.MILTrainConfig` is declared here once, as an
:class:`Option`. :func:`check_settings` splits the ``--set`` pairs into training
settings and aggregator options and refuses, in one sentence naming the key, a
value of the wrong type or out of range, or a key the aggregator does not take.
A test walks every registered aggregator and checks that its constructor's
keyword arguments and this table agree, so a new option cannot be forgotten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from histofm.errors import HistofmError


@dataclass(frozen=True)
class Option:
    """One setting: its kind and the values it accepts.

    Attributes:
        kind: ``"int"``, ``"float"``, ``"bool"``, ``"choice"``, ``"int_list"`` or ``"dict"``.
        low: smallest accepted value (ints, floats), or ``None``.
        high: largest accepted value, or ``None``.
        low_open: ``low`` itself is refused.
        high_open: ``high`` itself is refused (``dropout < 1``).
        choices: accepted values of a ``"choice"``.
        optional: ``null`` (None) is accepted.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.kind == "int_list":
            return "a list of positive integers such as [384,768]"
        if self.kind == "dict":
            return "a JSON object such as {\"hidden_dim\":64}"
        word = "an integer" if self.kind == "int" else "a number"
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{word}{' ' + bounds if bounds else ''}{' (or null)' if self.optional else ''}"

    def check(self, key: str, value: Any, flag: str = "--set") -> Any:
        """``value`` converted to the declared kind; raises :class:`HistofmError` naming ``flag key=``."""

        def bad() -> HistofmError:
            if flag == "--set":
                return HistofmError(f"--set {key}={value!r} is not valid; {key} must be {self.describe()}.")
            return HistofmError(f"{flag} {value!r} is not valid; {flag} must be {self.describe()}.")

        if value is None:
            if self.optional:
                return None
            raise bad()
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise bad()
        if self.kind == "choice":
            if isinstance(value, bool) or value not in self.choices:
                raise bad()
            return value
        if self.kind == "int_list":
            if not isinstance(value, list) or not value or any(
                isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value
            ):
                raise bad()
            return value
        if self.kind == "dict":
            if not isinstance(value, dict):
                raise bad()
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if self.kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad()
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad()
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad()
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad()
        return value


_SIZE = Option("int", 1, 65536)
_DROPOUT = Option("float", 0.0, 1.0, high_open=True)

# Constructor options of each aggregator (beyond in_dim and num_classes).
AGGREGATOR_OPTIONS: dict[str, dict[str, Option]] = {
    "mean": {"hidden_dim": _SIZE, "dropout": _DROPOUT},
    "max": {"hidden_dim": _SIZE, "dropout": _DROPOUT},
    "abmil": {"hidden_dim": _SIZE, "attn_dim": _SIZE, "gated": Option("bool"), "dropout": _DROPOUT},
    "abmil_plain": {"hidden_dim": _SIZE, "attn_dim": _SIZE, "gated": Option("bool"), "dropout": _DROPOUT},
    "clam_sb": {"hidden_dim": _SIZE, "attn_dim": _SIZE, "dropout": _DROPOUT, "k_sample": Option("int", 1, 65536),
                "inst_weight": Option("float", 0.0, 1.0), "subtyping": Option("bool")},
    "clam_mb": {"hidden_dim": _SIZE, "attn_dim": _SIZE, "dropout": _DROPOUT, "k_sample": Option("int", 1, 65536),
                "inst_weight": Option("float", 0.0, 1.0), "subtyping": Option("bool")},
    "dsmil": {"hidden_dim": _SIZE, "query_dim": _SIZE, "dropout": _DROPOUT},
    "transmil": {"dim": Option("int", 2, 8192), "num_heads": Option("int", 1, 64),
                 "num_landmarks": Option("int", 1, 8192, optional=True), "dropout": _DROPOUT,
                 "score_layer": Option("choice", choices=(1, 2)), "residual_kernel": Option("int", 0, 255),
                 "ppeg": Option("bool"), "num_layers": Option("choice", choices=(1, 2))},
    "transformer": {"dim": Option("int", 2, 8192), "depth": Option("int", 1, 48), "num_heads": Option("int", 1, 64),
                    "mlp_ratio": Option("float", 0.0, 64.0, low_open=True), "dropout": _DROPOUT},
    "moe": {"feature_dims": Option("int_list", optional=True), "num_experts": Option("int", 1, 64),
            "top_k": Option("int", 2, 64, optional=True), "expert": Option("choice", choices=()),  # filled below
            "expert_kwargs": Option("dict", optional=True),
            "balance_loss_weight": Option("float", 0.0, 100.0), "z_loss_weight": Option("float", 0.0, 100.0)},
}
AGGREGATOR_OPTIONS["moe"]["expert"] = Option("choice", choices=tuple(sorted(set(AGGREGATOR_OPTIONS) - {"moe"})))

# Training settings of MILTrainConfig: flags of their own (--lr ...) that `--set` may also change.
TRAIN_OPTIONS: dict[str, Option] = {
    "epochs": Option("int", 1, 100_000),
    "lr": Option("float", 0.0, 100.0, low_open=True),  # above, Adam's step size overflows float32
    "weight_decay": Option("float", 0.0, None),
    "batch_size": Option("int", 1, 100_000),
    "max_tiles": Option("int", 1, 1 << 40, optional=True),
    "loss": Option("choice", choices=("nll", "cox")),
    "n_bins": Option("int", 2, 1000),
    "alpha": Option("float", 0.0, 1.0),
    "val_fraction": Option("float", 0.0, 0.5),
    "patience": Option("int", 0, 1_000_000),
    "class_weight": Option("bool"),
    "n_boot": Option("int", 0, 100_000),
    "precision": Option("choice", choices=("fp32", "bf16", "fp16")),
}

# Flags of `mil train` that are not --set keys.
FLAG_OPTIONS: dict[str, Option] = {
    "--folds": Option("int", 2, 1000),
    "--seed": Option("int", 0, 2**32 - 1),  # numpy's seed range (folds are drawn by scikit-learn)
}


def _width_checks(aggregator: str, kwargs: dict[str, Any]) -> None:
    """Constraints between options (heads that divide the width)."""
    if aggregator in ("transmil", "transformer"):
        dim = kwargs.get("dim", 512 if aggregator == "transmil" else 192)
        heads = kwargs.get("num_heads", 8 if aggregator == "transmil" else 4)
        if dim % heads:
            raise HistofmError(f"--set num_heads={heads} does not divide dim={dim}; choose num_heads dividing dim.")
    if aggregator == "moe" and kwargs.get("expert_kwargs"):
        expert = kwargs.get("expert", "abmil")
        check_aggregator_options(expert, dict(kwargs["expert_kwargs"]))


def check_aggregator_options(aggregator: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against the aggregator's declared options (unknown aggregators pass through)."""
    spec = AGGREGATOR_OPTIONS.get(aggregator)
    if spec is None:
        return kwargs
    out = {}
    for key, value in kwargs.items():
        if key not in spec:
            known = ", ".join(sorted({*spec, *TRAIN_OPTIONS}))
            raise HistofmError(f"--set {key} is not an option of {aggregator} or of training; use one of {known}.")
        out[key] = spec[key].check(key, value)
    _width_checks(aggregator, out)
    return out


def check_settings(aggregator: str, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``--set`` pairs into (training settings, aggregator options), each checked."""
    train = {k: TRAIN_OPTIONS[k].check(k, v) for k, v in settings.items() if k in TRAIN_OPTIONS}
    model = check_aggregator_options(aggregator, {k: v for k, v in settings.items() if k not in TRAIN_OPTIONS})
    return train, model
