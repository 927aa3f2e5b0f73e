"""Every module of the packages imports, and no two modules import each other in a circle.

The import graph is read from the source (the `import` statements, at any depth of a module, so an import inside
a function counts too): a cycle is a design fault even when Python happens to resolve it at run time."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("datasets", "engine", "evaluation", "losses", "model", "prediction", "utils", "visualization")
ENTRY_POINTS = ("train", "test", "benchmark", "app")
# Known cycles another change removes; each listed with why it is still here. Empty once they are gone.
KNOWN_CYCLES: set[frozenset] = set()


def module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(name: str, known: set[str]) -> set[str]:
    """The project modules `name` imports (`from package import module` counts the module itself)."""
    path = REPO / Path(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = set(module_names())
    # a package's __init__ imports its own modules by design; an edge to a package stands for the package file
    return {name: imported_modules(name, known) for name in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_edges_removed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the edges between a package's __init__ and its own modules (a package re-exporting its
    modules, and the modules importing siblings through the package, are one unit, not a circle)."""
    packages = {name for name in graph if (REPO / Path(*name.split("."))).is_dir()}
    return {name: {m for m in targets if not ((m in packages and name.startswith(m + ".")) or
                                              (name in packages and m.startswith(name + ".")))}
            for name, targets in graph.items()}


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", module_names())
def test_every_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_imports(name):
    importlib.import_module(name)


def test_no_import_cycle_between_modules():
    found = [c for c in cycles(package_edges_removed(import_graph())) if frozenset(c) not in KNOWN_CYCLES]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_known_cycles_are_still_there():
    """A known exception that is gone must leave KNOWN_CYCLES, so it cannot come back unnoticed."""
    present = {frozenset(c) for c in cycles(package_edges_removed(import_graph()))}
    assert not KNOWN_CYCLES - present, f"remove from KNOWN_CYCLES: {KNOWN_CYCLES - present}"
