"""One vocabulary across the whole command tree (docs/cli.md).

Every sub-command, nested ones included, is walked from the real parser: its ``--help`` must end
with an example of that very command and show the default of every option that has one; old
spellings stay hidden; ``--out`` always names a directory; ``histofm --help`` lists exactly the
commands whose modules exist.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from collections.abc import Iterator

import pytest

from histofm import cli
from histofm.cli import build_parser, main

# Spellings that the vocabulary replaced: {old: new}. They may live on only as hidden aliases.
RETIRED = {"--arch": "--model", "--option": "--set", "--slide-mpp": "--mpp-override"}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))


PARSERS = dict(_walk(build_parser()))
COMMANDS = sorted(p for p in PARSERS if p)


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The options a user sees (help and version excluded)."""
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS and not isinstance(
            action, (argparse._HelpAction, argparse._VersionAction)
        ):
            yield action


def _help(path: tuple[str, ...], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_tree_holds_the_nested_commands() -> None:
    names = {" ".join(p) for p in COMMANDS}
    assert {"eval", "eval nuclei", "mil", "mil train", "pretrain", "env"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_shows_an_example_and_the_defaults(path: tuple[str, ...], capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    out = _help(path, capsys)
    assert f"\nexample:\n  histofm {' '.join(path)}" in out, f"`histofm {' '.join(path)} --help` has no example of itself"
    flat = "".join(out.split())  # wrapping may break a default anywhere
    for action in _options(PARSERS[path]):
        assert action.help, f"{path}: {action.option_strings[0]} has no help text"
        if action.default not in (None, argparse.SUPPRESS):
            value = "".join(str(action.default).split())
            assert f"default:{value}" in flat or f"default{value}" in flat, (
                f"{path}: the default of {action.option_strings[0]} ({action.default!r}) is not shown"
            )


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_one_vocabulary(path: tuple[str, ...]) -> None:
    parser = PARSERS[path]
    visible = {s for a in _options(parser) for s in a.option_strings}
    for old, new in RETIRED.items():
        assert old not in visible, f"`histofm {' '.join(path)}` shows {old}; the vocabulary says {new}"
    for action in _options(parser):
        if "--out" in action.option_strings:
            words = action.help.lower()
            assert "dir" in words or "folder" in words, f"{path}: --out must be a directory, and its help say so"
        if "--model" in action.option_strings:  # the tile encoder, never the aggregator
            assert "aggregator" not in action.help, f"{path}: the aggregator is --aggregator"


def test_top_level_help_lists_exactly_the_commands_that_exist(capsys) -> None:
    out = _help((), capsys)
    listed = set(PARSERS[()]._subparsers._group_actions[0].choices)
    assert listed == {m.replace("_", "-") for m in cli.COMMAND_MODULES}  # module slide_embed: `slide-embed`
    for module in cli.COMMAND_MODULES:
        assert importlib.util.find_spec(f"histofm.commands.{module}") is not None
        assert re.search(rf"\n    {module.replace('_', '-')}\s", out), f"{module} is not listed"
    assert "example:" in out


def test_a_missing_command_module_is_an_error_not_a_silent_skip(monkeypatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "no_such_command"))
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        build_parser()

