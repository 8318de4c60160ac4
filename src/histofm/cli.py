"""The ``histofm`` command line.

Each sub-command lives in ``histofm/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed arguments and returning an exit code. Errors a user can fix
(:class:`HistofmError`) print one sentence and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from histofm import __version__
from histofm.errors import HistofmError

# Order is the order shown by `histofm --help`.
COMMAND_MODULES = (
    "models",
    "tile",
    "shard",
    "extract",
    "slide_embed",
    "pretrain",
    "eval",
    "mil",
    "semi",
    "cluster",
    "zeroshot",
    "segment",
    "demo",
    "env",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histofm", description="Foundation models for computational pathology.",
        epilog="example:\n  histofm demo --quick\n  histofm COMMAND --help   (each command's options, defaults and "
               "an example; docs/cli.md)\n  histofm env              (what this installation can do)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"histofm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        # A missing module is a packaging bug, not a command to hide: let the import error show.
        importlib.import_module(f"histofm.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    # Warnings read like the errors: one line, no Python source line (restored after, for callers in Python).
    previous_format = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return int(args.func(args) or 0)
    except HistofmError as e:
        print(f"histofm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histofm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the flush at exit goes nowhere instead of failing again
        return 0
    finally:
        warnings.formatwarning = previous_format


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """``histofm: warning: <message>``: what the command line prints for a Python warning."""
    return f"histofm: warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
