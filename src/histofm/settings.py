"""Settings: each config field declares its type and range once, and is checked before any work.

A config is a frozen dataclass. Its annotations give each field's type (``int``,
``float``, ``bool``, ``str``, a ``Literal`` enum, ``X | None``, ``tuple[...]``,
``dict``); :func:`setting` adds the range and cross-field rules in the same line::

    @dataclass(frozen=True)
    class MAEConfig:
        mask_ratio: float = setting(0.75, range="(0, 1)")
        decoder_dim: int = setting(512, range=">= 1")
        decoder_heads: int = setting(16, range=">= 1", divides="decoder_dim")

        def __post_init__(self) -> None:
            check_config(self)

Values arrive from three places: YAML (``--config``), ``--set KEY=VALUE`` and the
Python API. They all pass through :func:`coerce` (type) and :func:`check_config`
(range, cross-field rules), which raise :class:`SettingError` naming the key as the
user typed it, for example ``temperature must be > 0, got 0``. The command line
prefixes where the value came from (``--set temperature=0: ...``).

Floats must be finite (no ``nan``, ``inf``) unless a field says ``finite=False``.
An ``int`` field takes whole numbers only (``steps=1.5`` is an error, ``1e3`` is
1000); a ``bool`` field takes ``true``/``false`` only (``yes``/``no``/``on``/``off``
and ``1``/``0`` too, YAML's spellings).

This module sits on the lowest floor: it imports only :mod:`histofm.errors`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from histofm.errors import HistofmError

__all__ = [
    "Rule",
    "SettingError",
    "check_config",
    "check_field",
    "coerce",
    "declared_fields",
    "load_config_file",
    "parse_value",
    "replace_config",
    "setting",
    "shown",
    "split_backbone_overrides",
]

_META = "histofm_setting"
# Numbers that YAML 1.1 (PyYAML) leaves as strings, such as 1e-3.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class SettingError(HistofmError):
    """A setting with a wrong type or out of range; ``key`` is the dotted name the user typed."""

    def __init__(self, key: str, problem: str, message: str | None = None) -> None:
        self.key = key
        self.problem = problem
        super().__init__(message or f"{key} {problem}.")


def shown(text: object) -> str:
    """``text`` as it can be quoted in a one-line message (control characters escaped)."""
    t = str(text)
    return t if t.isprintable() else repr(t)[1:-1]


# --------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class Rule:
    """Range and cross-field rules of one setting (stored in the dataclass field's metadata).

    Attributes:
        lo, hi: bounds (``None``: unbounded); ``lo_open``/``hi_open``: strict bounds.
        finite: floats must be finite.
        of: for a ``dict`` field, the dataclass whose fields its keys must be.
        divides: name of a field that this one must divide (heads divide the width).
        ordered: a tuple's items must not decrease (a ``(min, max)`` range).
        allow_zero: 0 is also accepted besides ``range`` (``0`` meaning "off" or "automatic").
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    finite: bool = True
    of: type | None = None
    divides: str | None = None
    ordered: bool = False
    allow_zero: bool = False

    def describe(self) -> str:
        """The range in words, e.g. ``> 0``, ``in [0, 1]``."""
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            return ""
        return f"0 or {text}" if self.allow_zero else text

    def contains(self, x: float) -> bool:
        if self.allow_zero and x == 0:
            return True
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_INTERVAL = re.compile(r"\s*([\[(])\s*([-+\w.]+)\s*,\s*([-+\w.]+)\s*([\])])\s*")
_BOUND = re.compile(r"\s*(>=|>|<=|<)\s*([-+\w.]+)\s*")


def _parse_range(spec: str) -> dict[str, Any]:
    """``"> 0"``, ``">= 1"``, ``"[0, 1]"``, ``"(0, 1]"`` -> Rule keyword arguments."""
    m = _INTERVAL.fullmatch(spec)
    if m:
        return {"lo": float(m[2]), "hi": float(m[3]), "lo_open": m[1] == "(", "hi_open": m[4] == ")"}
    m = _BOUND.fullmatch(spec)
    if m:
        op, v = m[1], float(m[2])
        return {"lo": v, "lo_open": op == ">"} if op.startswith(">") else {"hi": v, "hi_open": op == "<"}
    raise HistofmError(f"Setting range {spec!r} is not a range spec; declare it like '>= 1', '> 0' or '[0, 1)'.")  # a programming error in a declaration


def setting(
    default: Any = MISSING,  # noqa: ANN401
    *,
    range: str | None = None,  # noqa: A002 - the word a reader expects
    default_factory: Any = MISSING,  # noqa: ANN401
    finite: bool = True,
    of: type | None = None,
    divides: str | None = None,
    ordered: bool = False,
    allow_zero: bool = False,
) -> Any:  # noqa: ANN401
    """A dataclass field with its declared range and rules (see :class:`Rule`)."""
    rule = Rule(**(_parse_range(range) if range else {}), finite=finite, of=of, divides=divides, ordered=ordered,
                allow_zero=allow_zero)
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={_META: rule})
    return dataclasses.field(default=default, metadata={_META: rule})


_HINTS: dict[type, dict[str, Any]] = {}


def declared_fields(cls: type) -> dict[str, tuple[Any, Rule]]:
    """``{field: (type, rule)}`` of a config dataclass (type hints resolved once per class)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    hints = _HINTS[cls]
    return {f.name: (hints.get(f.name, Any), f.metadata.get(_META, Rule())) for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------- parsing
def parse_value(raw: str) -> Any:  # noqa: ANN401
    """One ``--set`` value: YAML (``4``, ``false``, ``[1, 2]``, ``abc``), with ``1e-3`` read as a number."""
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in (".nan", "nan", "inf", "+inf", "-inf", ".inf", "-.inf"):
        return float(value.strip().lower().lstrip("."))  # non-finite: rejected by the type check, not a string
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML ``--config`` file into a dict; any unreadable file is one :class:`HistofmError`."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise HistofmError(f"Config file {p} does not exist (or is a folder); check --config.")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HistofmError(f"Config file {p} is not UTF-8 text (binary?); give --config a YAML file.") from None
    except OSError as e:
        raise HistofmError(f"Config file {p} cannot be read ({e.strerror}); check its permissions.") from None
    if "\x00" in text:
        raise HistofmError(f"Config file {p} is binary, not YAML text; give --config a YAML file.")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HistofmError(f"Config file {p} is not valid YAML ({type(e).__name__}); fix it or drop --config.") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise HistofmError(f"Config file {p} must hold a mapping of settings (key: value lines).")
    return data


# --------------------------------------------------------------------------- type coercion
def _type_name(tp: Any) -> str:  # noqa: ANN401
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a float", bool: "true or false", str: "text"}.get(tp, str(tp))


def coerce(tp: Any, value: Any, key: str, rule: Rule | None = None) -> Any:  # noqa: ANN401
    """``value`` converted to the declared type ``tp`` and checked against ``rule``.

    Raises:
        SettingError: wrong type or out of range, naming ``key``.
    """
    rule = rule or Rule()
    if tp is Any:
        return value
    if isinstance(value, Path):
        value = str(value)
    origin = get_origin(tp)
    if isinstance(value, str) and tp is not str and not (origin is Literal and all(isinstance(a, str) for a in get_args(tp))):
        if origin in (Union, types.UnionType) and str in get_args(tp):
            pass  # a str arm takes the text as is
        else:
            value = parse_value(value)
    if origin in (Union, types.UnionType):
        arms = get_args(tp)
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and type(None) in arms:
            value = None
        if value is None:
            if type(None) in arms:
                return None
            raise SettingError(key, f"expects {_type_name(tp)}, got null")
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return coerce(arm, value, key, rule)
            except SettingError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise SettingError(key, f"expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c and type(value) is type(c):
                return c
        raise SettingError(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise SettingError(key, f"expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SettingError(key, f"expects an integer, got {value!r}")
        _check_range(value, key, rule)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SettingError(key, f"expects a float, got {value!r}")
        value = float(value)
        if rule.finite and not math.isfinite(value):
            raise SettingError(key, f"must be a finite number, got {value}")
        _check_range(value, key, rule)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SettingError(key, f"expects text, got {value!r}")
        return value
    if origin is tuple:
        return _coerce_tuple(tp, value, key, rule)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SettingError(key, f"expects a mapping of settings (key: value), got {value!r}")
        if rule.of is not None:
            return coerce_fields(rule.of, value, prefix=f"{key}.")
        return dict(value)
    return value


def _coerce_tuple(tp: Any, value: Any, key: str, rule: Rule) -> tuple[Any, ...]:  # noqa: ANN401
    args = get_args(tp)
    if isinstance(value, str):
        value = [parse_value(v) for v in value.split(",")]
    if not isinstance(value, (list, tuple)):
        raise SettingError(key, f"expects a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        types_ = [args[0]] * len(value)
        if not value:
            raise SettingError(key, "must not be empty")
    else:
        if len(value) != len(args):
            raise SettingError(key, f"must be a list of {len(args)} values, got {len(value)}")
        types_ = list(args)
    out = tuple(coerce(t, v, key, rule) for t, v in zip(types_, value))
    if rule.ordered and any(a > b for a, b in zip(out, out[1:])):
        raise SettingError(key, f"must be in increasing order (min, max), got {list(out)}")
    return out


def _check_range(x: float, key: str, rule: Rule) -> None:
    if not rule.contains(x):
        raise SettingError(key, f"must be {rule.describe()}, got {_num(x) if math.isfinite(x) else x}")


def coerce_fields(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Coerce a dict of changes to the fields of dataclass ``cls``; unknown keys raise :class:`SettingError`."""
    decl = declared_fields(cls)
    unknown = [k for k in values if k not in decl]
    if unknown:
        valid = ", ".join(sorted(decl))
        raise SettingError(shown(f"{prefix}{unknown[0]}"), f"is not a setting of {cls.__name__} (valid: {valid})",
                           f"Unknown option(s) {', '.join(shown(prefix + k) for k in unknown)} for {cls.__name__}; "
                           f"valid ones are {valid}.")
    out = {}
    for k, v in values.items():
        tp, rule = decl[k]
        out[k] = coerce(tp, v, f"{prefix}{k}", rule)
    return out


# --------------------------------------------------------------------------- whole configs
def check_field(cfg: Any, name: str, prefix: str = "") -> None:  # noqa: ANN401
    """Check one field of a built config against its declaration."""
    tp, rule = declared_fields(type(cfg))[name]
    value = getattr(cfg, name)
    if isinstance(value, list) and get_origin(_strip_none(tp)) is tuple:
        value = tuple(value)
    coerce(tp, value, f"{prefix}{name}", rule)


def _strip_none(tp: Any) -> Any:  # noqa: ANN401
    if get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        return arms[0] if len(arms) == 1 else tp
    return tp


def check_config(cfg: Any, prefix: str = "") -> None:  # noqa: ANN401
    """Check every field of dataclass ``cfg`` (type, range, finiteness) and the cross-field rules.

    Call it from the config's ``__post_init__`` so that no config with a bad value exists.

    Raises:
        SettingError: the first bad setting, named ``prefix + field``.
    """
    decl = declared_fields(type(cfg))
    for name in decl:
        check_field(cfg, name, prefix)
    for name, (_, rule) in decl.items():
        if rule.divides is not None:
            n, total = getattr(cfg, name), getattr(cfg, rule.divides)
            if n and total % n:
                raise SettingError(f"{prefix}{name}", f"must divide {prefix}{rule.divides}={total}, got {n}")


def replace_config(cfg: Any, changes: dict[str, Any], prefix: str = "") -> Any:  # noqa: ANN401
    """``dataclasses.replace`` after coercing ``changes`` to the declared types (the config then checks itself)."""
    fixed = coerce_fields(type(cfg), changes, prefix)
    try:
        new = dataclasses.replace(cfg, **fixed)
    except SettingError as e:
        if prefix and not e.key.startswith(prefix):
            raise SettingError(prefix + e.key, e.problem) from None
        raise
    if not hasattr(type(cfg), "__post_init__"):
        check_config(new, prefix)
    return new


def split_backbone_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a method's overrides into its config's keys and the backbone's ``create_model`` keys.

    Backbone keys come in a ``"backbone_kwargs"`` dict, a ``"backbone"`` dict or as ``"backbone.<arg>"``
    keys (the command line's form); later forms win in that order. The one place that does this split.
    """
    rest = dict(overrides)
    backbone: dict[str, Any] = {}
    for group in ("backbone_kwargs", "backbone"):
        value = rest.pop(group, None) or {}
        if not isinstance(value, dict):
            raise SettingError(group, f"expects a mapping of backbone arguments, got {value!r}")
        backbone.update(value)
    for key in [k for k in rest if k.startswith("backbone.")]:
        backbone[key.split(".", 1)[1]] = rest.pop(key)
    return rest, backbone


def config_replace(cfg: Any, changes: dict[str, Any]) -> Any:  # noqa: ANN401
    """``dataclasses.replace`` with values coerced to the declared types and checked.

    Lives on the bottom floor so that methods and the engine can both use it.

    Raises:
        HistofmError: an unknown key, a wrong type or an out-of-range value, naming the key.
    """
    return replace_config(cfg, changes)
