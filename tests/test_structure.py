"""The shape of the package: no import circle between celebctl's modules, no module too long.

The imports are read from the source (every ``import`` and ``from ... import``, also those inside
functions, which run later but still tie two modules together), not by importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "celebctl"
MAX_LINES = 500
# Modules the project has not split yet; remove a name once its module is split.
TOO_LONG_FOR_NOW: set[str] = set()


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the celebctl modules it imports (submodules named in ``from x import y`` count
    as y, not x, when y is a module)."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    root = package.name
    graph = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == root)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != root:
                    continue
                submodules = [f"{target}.{a.name}" for a in node.names
                              if f"{target}.{a.name}" in modules]
                found.update(submodules)
                if len(submodules) < len(node.names):  # a name defined in ``target`` itself
                    found.add(target)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_circle_finder_finds_a_circle_inside_functions():
    graph = {"celebctl.a": {"celebctl.b"}, "celebctl.b": {"celebctl.c"},
             "celebctl.c": {"celebctl.a"}, "celebctl.d": {"celebctl.a"}}
    assert import_circles(graph) == [["celebctl.a", "celebctl.b", "celebctl.c"]]


def test_the_graph_counts_imports_inside_functions(tmp_path):
    package = tmp_path / "celebctl"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .one import thing\n")
    (package / "sub" / "one.py").write_text("def f():\n    from . import two\n")
    (package / "sub" / "two.py").write_text("from ..sub.one import f\n")
    graph = import_graph(package)
    assert graph["celebctl.sub.one"] == {"celebctl.sub.two"}
    assert graph["celebctl.sub.two"] == {"celebctl.sub.one"}
    assert import_circles(graph) == [["celebctl.sub.one", "celebctl.sub.two"]]


def test_no_import_circle_in_celebctl():
    assert import_circles(import_graph()) == []


def test_no_module_past_the_line_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert set(long) <= TOO_LONG_FOR_NOW, f"split by concept: {long}"
