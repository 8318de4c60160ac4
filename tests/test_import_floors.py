"""The floors of issue 17: every module imports only from its own floor or below, and nothing forms a cycle.

The import graph is read from the source with :mod:`ast`, so it sees every ``import`` and
``from ... import`` in a module: at the top, inside functions and methods, and under
``if TYPE_CHECKING:`` alike. TYPE_CHECKING-only imports COUNT: they never run, so they
cannot break an import at run time, but a type named from a higher floor is still a
dependency a reader has to open, and it is one line away from becoming a real import.
The implicit import of parent packages (``import histofm.data.augment`` also runs
``histofm/__init__.py`` and ``histofm/data/__init__.py``) is not an edge; an explicit
``from histofm import create_model`` is an edge to the root package ``histofm``.

``ALLOWED_UPWARD`` lists today's known upward imports (the debt of issue 17). The test fails
on any upward import not in it, and also on any listed pair that no longer occurs, so the
list can only shrink: remove a line when you fix its import.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The one place that maps a module to its floor (issue 17, "The house we want"); the most
# specific prefix wins. docs/architecture.md explains each floor.
FLOORS: dict[str, int] = {
    # 1: errors, small utilities, constants
    "histofm.errors": 1,
    "histofm.utils": 1,
    "histofm._version": 1,
    "histofm.settings": 1,
    "histofm.checks": 1,
    "histofm.tables": 1,
    "histofm.constants": 1,
    # 2: building blocks shared by several models
    "histofm.layers": 2,
    # 3: architectures, checkpoint conversion, speed-ups that act on architectures
    "histofm.models": 3,
    "histofm.accel": 3,
    # 4: the registry leaf: ModelInfo, register_model (imports nothing above floor 3)
    "histofm._registry": 4,
    # 5: the zoo: named architectures and their weights' records, registered into the leaf
    "histofm.zoo": 5,
    # 6: the factory: create_model / list_models, hub download, weights the user named
    "histofm.registry": 6,
    "histofm.hub": 6,
    "histofm.weights": 6,
    # 7: data and whole-slide images (readers, tiling, features)
    "histofm.data": 7,
    "histofm.wsi": 7,
    "histofm.medical.dicom": 7,
    # 8: what is learnt and measured: SSL methods, MIL aggregators, semi-supervised, evaluation
    "histofm.methods": 8,
    "histofm.mil": 8,
    "histofm.cells": 8,
    "histofm.learning": 8,
    "histofm.eval": 8,
    # 9: the engine, and what trains through it: the real-pixel MIL task fits every aggregator
    #    with the engine (histofm.train.mil) before it scores them
    "histofm.train": 9,
    "histofm.eval.mil_task": 9,
    # 10: what users run: the CLI, its commands, the demo and worked examples
    # the root package is the public facade (``histofm.create_model``, ``histofm.tokenize``):
    # it re-exports from every floor, so nothing inside the package imports it
    "histofm": 10,
    "histofm.commands": 10,
    "histofm.cli": 10,
    "histofm.__main__": 10,
    "histofm.demo": 10,
    "histofm.medical": 10,
}

# (importer, imported): why it is still there. Known debt of issue 17; this list only shrinks.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``src/histofm``."""
    mods = {}
    for path in sorted((src / "histofm").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` starts with (``histofm.x.func`` -> ``histofm.x``)."""
    while name not in mods:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the histofm modules it imports anywhere in its source."""
    mods = module_files(src)
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: climb from this module's package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # ``from histofm.wsi import tiling`` imports the submodule, ``from histofm.wsi import X`` the package
                targets.update(f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names)
        resolved = {_resolve(t, mods) for t in targets if t == "histofm" or t.startswith("histofm.")}
        graph[mod] = {t for t in resolved if t is not None and t != mod}
    return graph


def floor_of(mod: str) -> int:
    """The floor of ``mod`` from :data:`FLOORS` (most specific prefix)."""
    name = mod
    while name not in FLOORS:
        if "." not in name:
            raise KeyError(f"module {mod} has no floor: add it (or its package) to FLOORS")
        name = name.rsplit(".", 1)[0]
    return FLOORS[name]


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Every (importer, imported) pair where the imported module sits on a higher floor."""
    return {(a, b) for a, targets in graph.items() for b in targets if floor_of(b) > floor_of(a)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_every_module_has_a_floor() -> None:
    missing = [m for m in module_files() if _floor_or_none(m) is None]
    assert not missing, f"modules without a floor in FLOORS: {missing}"


def _floor_or_none(mod: str) -> int | None:
    try:
        return floor_of(mod)
    except KeyError:
        return None


def test_floors_only_look_down_and_nothing_cycles() -> None:
    graph = import_graph()
    found_cycles = cycles(graph)
    upward = upward_imports(graph)
    new = sorted(upward - set(ALLOWED_UPWARD))
    stale = sorted(set(ALLOWED_UPWARD) - upward)
    lines = [
        f"{len(found_cycles)} import cycle(s), {len(upward)} upward import(s) "
        f"({len(upward & set(ALLOWED_UPWARD))} allowlisted), {len(new)} new, {len(stale)} allowlisted but gone",
    ]
    lines += [f"cycle of {len(c)}: {' -> '.join(c)}" for c in found_cycles]
    lines += [f"NEW upward import: {a} (floor {floor_of(a)}) -> {b} (floor {floor_of(b)})" for a, b in new]
    lines += [f"allowlisted pair no longer occurs, delete it from ALLOWED_UPWARD: {a} -> {b}" for a, b in stale]
    assert not (found_cycles or new or stale), "\n".join(lines)


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The graph reader itself, on a toy package: top-level, function-level, TYPE_CHECKING and relative imports."""
    pkg = tmp_path / "histofm"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from histofm.a import f\n",
        "a.py": "def f():\n    from histofm.b import g\n    return g\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from histofm.sub import c\ng = 1\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import a\nfrom . import d\nimport numpy\n",
        "sub/d.py": "import histofm.errors\n",
        "errors.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["histofm"] == {"histofm.a"}
    assert graph["histofm.a"] == {"histofm.b"}  # inside a function
    assert graph["histofm.b"] == {"histofm.sub.c"}  # under TYPE_CHECKING
    assert graph["histofm.sub.c"] == {"histofm.a", "histofm.sub.d"}  # relative, numpy ignored
    assert graph["histofm.sub.d"] == {"histofm.errors"}
    assert cycles(graph) == [["histofm.a", "histofm.b", "histofm.sub.c"]]
    assert upward_imports({"histofm.layers.mlp": {"histofm.zoo.generic", "histofm.errors"}}) == {
        ("histofm.layers.mlp", "histofm.zoo.generic")
    }
    assert floor_of("histofm.zoo.pluto") == 5 and floor_of("histofm.medical.dicom") == 7
