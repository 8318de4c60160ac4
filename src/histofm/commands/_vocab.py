"""The shared words of the command line: the one ``--set KEY=VALUE`` parser and hidden, deprecated aliases.

Old spellings (``--arch``, ``--option``) keep working as hidden aliases of the new flag: they
are left out of ``--help`` and print one deprecation line to stderr, then act exactly like the
flag they stand for. See ``docs/cli.md`` for the vocabulary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from histofm.errors import HistofmError
from histofm.settings import parse_value

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
        raise HistofmError(f"{new} is required, so {old} cannot stand in for it; check the value in the command instead.")
    parser.add_argument(
        old, action=_DeprecatedAlias, target=target, dest=target.dest, default=argparse.SUPPRESS,
        nargs=target.nargs, type=target.type, choices=target.choices, metavar=target.metavar,
        help=argparse.SUPPRESS,
    )


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable), the one spelling of settings in every command."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def split_set(items: Sequence[str], flag: str = "--set", example: str = "depth=4") -> dict[str, str]:
    """``["depth=4", "name = abc"]`` -> ``{"depth": "4", "name": "abc"}``: keys stripped, values left as typed.

    The one ``KEY=VALUE`` splitter of the command line; :func:`parse_set` reads the values too.

    Raises:
        HistofmError: an item without ``=`` or with an empty key.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HistofmError(f"{flag} {item!r} is not KEY=VALUE; write for example {flag} {example}.")
        out[key] = raw
    return out


def parse_set(items: Sequence[str], flag: str = "--set", example: str = "depth=4") -> dict[str, Any]:
    """``["depth=4", "gated=false"]`` -> ``{"depth": 4, "gated": False}``; each value is read by
    :func:`histofm.settings.parse_value` (YAML, with ``1e-3`` and ``nan`` read as numbers).

    Raises:
        HistofmError: an item without ``=`` or with an empty key.
    """
    return {key: parse_value(raw) for key, raw in split_set(items, flag, example).items()}
