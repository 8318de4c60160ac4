"""The shared words of the command line: ``--set KEY=VALUE`` parsing and hidden, deprecated aliases.

Old spellings (``--arch``, ``--option``) keep working as hidden aliases of the new flag: they
are left out of ``--help`` and print one deprecation line to stderr, then act exactly like the
flag they stand for. See ``docs/cli.md`` for the vocabulary.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histofm.errors import HistofmError

# Numbers that YAML 1.1 (PyYAML) leaves as strings, such as 1e-3.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# Attribute of the parsed namespace that remembers which aliases were already reported.
_NOTICED = "_histofm_deprecated_noticed"


class _DeprecatedAlias(argparse.Action):
    """Forwards an old option string to the action of its new spelling, with a notice."""

    def __init__(self, option_strings: Sequence[str], dest: str, target: argparse.Action, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(option_strings, dest, **kwargs)
        self.target = target

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,  # noqa: ANN401
        option_string: str | None = None,
    ) -> None:
        new = self.target.option_strings[-1]
        noticed: set[str] = getattr(namespace, _NOTICED, set())
        if option_string not in noticed:
            print(f"histofm: note: {option_string} is deprecated; use {new} (same meaning).", file=sys.stderr)
            noticed.add(str(option_string))
            setattr(namespace, _NOTICED, noticed)
        self.target(parser, namespace, values, new)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a hidden alias of the already-added option ``new``.

    ``new`` must not be ``required=True``: argparse would not count the alias as giving it.
    """
    target = parser._option_string_actions[new]  # argparse keeps no public map of option strings
    if target.required:
        raise ValueError(f"{new} is required, so {old} cannot stand in for it; check the value in the command instead.")
    parser.add_argument(
        old, action=_DeprecatedAlias, target=target, dest=target.dest, default=argparse.SUPPRESS,
        nargs=target.nargs, type=target.type, choices=target.choices, metavar=target.metavar,
        help=argparse.SUPPRESS,
    )


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``--out`` is always a directory: refuse an existing file (before any work) with one sentence."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise HistofmError(f"{flag} {out} is a file, but {flag} names a directory (created if needed); "
                           "pass a folder path instead.")
    for parent in out.parents:  # a file further up makes the folder impossible too
        if parent.exists():
            if not parent.is_dir():
                raise HistofmError(f"{flag} {out} lies under the file {parent}; pass a folder path instead.")
            break
    return out


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable), the one spelling of settings in every command."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["depth=4", "gated=false"]`` -> ``{"depth": 4, "gated": False}``; values are read as YAML
    (and ``1e-3``, a string to YAML 1.1, as the number it is).

    Raises:
        HistofmError: an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HistofmError(f"--set {item!r} is not KEY=VALUE; write for example --set depth=4.")
        out[key] = parse_value(raw)
    return out


def parse_value(raw: str) -> Any:  # noqa: ANN401
    """One ``--set`` value: YAML (``4``, ``false``, ``[1, 2]``, ``abc``), with ``1e-3`` read as a number."""
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value
