"""What every sub-command's parser shares: help that shows the defaults and an example.

One vocabulary across commands (see ``docs/cli.md``): the tile encoder is ``--model``, the MIL
aggregator ``--aggregator``, settings are ``--set KEY=VALUE``, the level-0 override is
``--mpp-override`` and ``--out`` is always a directory.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the example's line breaks.

    A default of ``None`` means "not set" (chosen later, or absent) and is not printed as ``(default: None)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_command(
    sub: argparse._SubParsersAction, name: str, *, help: str, example: str, description: str | None = None
) -> argparse.ArgumentParser:
    """Add sub-command ``name`` whose ``--help`` ends with ``example`` (one or more command lines)."""
    lines = "\n".join(f"  {line}" for line in example.strip().splitlines())
    return sub.add_parser(
        name, help=help, description=description or help, epilog=f"example:\n{lines}", formatter_class=HelpFormatter
    )
