"""``histofm models``: the model zoo as a table (rich), as markdown, or one model's full record."""

from __future__ import annotations

import argparse
import dataclasses

from histofm.commands._common import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "models", help="list the pathology foundation-model zoo",
                    example="histofm models\nhistofm models uni2_h\nhistofm models --markdown > zoo.md")
    p.add_argument("name", nargs="?", help="show the full info record of one model")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown (the README's table)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from histofm.registry import model_info
    from histofm.zoo.table import COLUMNS, zoo_markdown_table, zoo_rows

    console = Console(soft_wrap=True)
    if args.name is not None:
        info = model_info(args.name)  # unknown names raise HistofmError with suggestions
        table = Table(title=info.name, show_header=False)
        for field in dataclasses.fields(info):
            table.add_row(field.name, str(getattr(info, field.name)))
        console.print(table)
        return 0
    if args.markdown:
        print(zoo_markdown_table(), end="")
        return 0
    table = Table(title="histofm model zoo")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in zoo_rows():
        table.add_row(*row)
    console.print(table)
    return 0
