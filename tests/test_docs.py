"""The documentation holds together: index links resolve, pages name real files and tests.

* every relative link in ``docs/index.md`` points at a file (or a folder of pages) in ``docs/``;
* every page linked from the index names at least one existing source file
  (``src/histofm/...`` or ``histofm/...`` in backticks) and one existing test file
  (``tests/test_*.py``): the issue asks each page for the file that implements the
  idea and the test that checks it;
* every backticked path in ``docs/**/*.md`` that looks like a repository file
  (``src/...``, ``tests/...``, ``benchmarks/...``, ``notebooks/...``) exists.

Paths may use brace lists (``src/histofm/wsi/{readers,tiling}.py``), globs
(``tests/test_zoo*.py``), pytest node ids (``tests/test_vit.py::test_x[a]``) and
line numbers (``src/histofm/cli.py:42``). Failures name the page and the path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
INDEX = DOCS / "index.md"
REPO_PREFIXES = ("src/", "tests/", "benchmarks/", "notebooks/")

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The page without fenced code blocks (example code, not references)."""
    return _FENCE.sub("", text)


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    out = []
    for option in m.group(1).split(","):
        out += _expand_braces(path[: m.start()] + option.strip() + path[m.end() :])
    return out


def _clean(token: str) -> str:
    """A backticked token reduced to a path: no node id, line number or trailing punctuation."""
    token = token.strip().split()[0] if token.strip() else ""
    token = token.split("::", 1)[0]
    token = re.sub(r":\d+(-\d+)?$", "", token)
    return token.rstrip(".,;:)")


def _repo_path(token: str) -> str | None:
    """The repository-relative path a token names, or ``None`` if it does not look like one."""
    path = _clean(token)
    if path.startswith("histofm/"):
        path = "src/" + path
    if not path.startswith(REPO_PREFIXES) or "<" in path or "..." in path:
        return None
    return path


def _exists(path: str) -> bool:
    for candidate in _expand_braces(path):
        if any(c in candidate for c in "*?["):
            if not any(ROOT.glob(candidate)):
                return False
        elif not (ROOT / candidate).exists():
            return False
    return True


def _paths(page: Path) -> list[str]:
    return [p for tok in _CODE.findall(_prose(page.read_text(encoding="utf-8"))) if (p := _repo_path(tok))]


def _index_links() -> list[str]:
    links = _LINK.findall(_prose(INDEX.read_text(encoding="utf-8")))
    return [link.split("#", 1)[0] for link in links if not re.match(r"^[a-z]+:", link) and not link.startswith("#")]


ALL_PAGES = sorted(DOCS.rglob("*.md"))
INDEX_LINKS = _index_links() if INDEX.is_file() else []
INDEX_PAGES = sorted({link for link in INDEX_LINKS if link.endswith(".md")})


def test_index_exists_and_links_pages() -> None:
    assert INDEX.is_file(), "docs/index.md is missing"
    assert len(INDEX_PAGES) >= 10, f"docs/index.md links only {len(INDEX_PAGES)} pages"


@pytest.mark.parametrize("link", sorted(set(INDEX_LINKS)))
def test_index_link_resolves_inside_docs(link: str) -> None:
    target = (DOCS / link).resolve()
    assert target.is_relative_to(DOCS.resolve()), f"docs/index.md links {link}, which is outside docs/"
    if link.endswith("/"):
        assert target.is_dir() and any(target.glob("*.md")), f"docs/index.md links {link}: no such folder of pages in docs/"
    else:
        assert target.is_file(), f"docs/index.md links {link}, but docs/{link} does not exist (page not written yet?)"


@pytest.mark.parametrize("page", INDEX_PAGES)
def test_page_names_a_source_file_and_a_test(page: str) -> None:
    path = DOCS / page
    if not path.is_file():
        pytest.fail(f"docs/{page} is listed in docs/index.md but does not exist (page not written yet?)")
    paths = [p for p in _paths(path) if _exists(p)]
    sources = [p for p in paths if p.startswith("src/histofm/")]
    tests = [p for p in paths if re.match(r"tests/(.*/)?test_[^/]*\.py$", _expand_braces(p)[0])]
    assert sources, f"docs/{page} names no existing source file (`src/histofm/...` or `histofm/...` in backticks)"
    assert tests, f"docs/{page} names no existing test file (`tests/test_*.py` in backticks)"


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_paths_named_in_page_exist(page: Path) -> None:
    missing = sorted({p for p in _paths(page) if not _exists(p)})
    assert not missing, f"docs/{page.relative_to(DOCS)} names files that do not exist: {', '.join(missing)}"


# ------------------------------------------------------------------ the checker checks itself
def test_path_helpers_catch_what_they_should(tmp_path: Path) -> None:
    assert _repo_path("src/histofm/cli.py:42") == "src/histofm/cli.py"
    assert _repo_path("tests/test_vit.py::test_x[a]") == "tests/test_vit.py"
    assert _repo_path("histofm/registry.py") == "src/histofm/registry.py"
    assert _repo_path("histofm.create_model") is None
    assert _repo_path("src/histofm/zoo/<vendor>.py") is None
    assert _expand_braces("a/{b,c}.py") == ["a/b.py", "a/c.py"]
    assert _exists("src/histofm/{registry,cli}.py")
    assert not _exists("src/histofm/{registry,no_such_module}.py")
    assert _exists("tests/test_d*.py")
    assert not _exists("tests/test_no_such_thing_*.py")
    page = tmp_path / "p.md"
    page.write_text("See `src/histofm/nope.py`.\n\n```python\n# `src/histofm/in_code.py`\n```\n")
    assert _paths(page) == ["src/histofm/nope.py"]
