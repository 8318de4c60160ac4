"""The README's model table is exactly what `histofm models --markdown` prints."""

from __future__ import annotations

import re
from pathlib import Path

from histofm.zoo import zoo_markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_zoo_table_is_current() -> None:
    text = README.read_text()
    match = re.search(r"<!-- zoo-table:start -->\n(.*?)<!-- zoo-table:end -->", text, flags=re.S)
    assert match, "README.md lacks the <!-- zoo-table:start/end --> markers"
    assert match.group(1) == zoo_markdown_table(), (
        "README model table is stale: regenerate it with `histofm models --markdown`"
    )
    assert text.count("<!-- zoo-table:start -->") == 1
