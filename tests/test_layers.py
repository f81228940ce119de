"""The package's import graph, read from the source with ``ast``: no import circles, and no import that
runs back up to a higher layer (data flows one way: data -> store -> model -> training -> tagging ->
search/serve -> cli). Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "alt_i2v"

# Lowest first. A module may import its own package and the packages of earlier layers, never a later
# layer, nor another package of its own layer unless the row says they go together (SIBLINGS). "alt_i2v" is
# the package root (``__version__`` and the lazy public names: it imports nothing when it is imported).
LAYERS: list[tuple[str, ...]] = [
    ("alt_i2v", "errors"),
    ("fsutil",),
    ("config",),
    ("progress",),
    ("data",),
    ("scraper", "store"),
    ("model", "ready"),
    ("training",),
    ("tagging",),
    ("search",),
    ("serve", "demo"),
    ("cli",),
    ("__main__",),
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# A model is ours (model/) or another tool's (ready/): the model directory detects both, and the
# deepdanbooru backbone builds on a ready project. The module graph between them has no circle.
SIBLINGS = {frozenset({"model", "ready"})}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module an imported dotted name lives in (``alt_i2v.store.Store`` -> ``alt_i2v.store``)."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "alt_i2v"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == "alt_i2v":
                    prefix = node.module
                else:
                    continue
                names = [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {_resolve(n, modules) for n in names}
        edges.discard(mod)
        graph[mod] = edges
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph()


def test_every_package_has_a_layer():
    assert {_package(m) for m in GRAPH} <= set(RANK), {_package(m) for m in GRAPH} - set(RANK)


def test_the_graph_is_read_from_the_source():
    """The reader sees relative, absolute and function-level imports (the test checks something)."""
    assert "alt_i2v.errors" in GRAPH["alt_i2v.fsutil"]
    assert "alt_i2v.store" in GRAPH["alt_i2v.training.pipeline"]
    assert "alt_i2v.tagging.tagger" in GRAPH["alt_i2v.search.build"]  # inside a function
    assert sum(len(e) for e in GRAPH.values()) > 150


def test_no_import_circles():
    assert _cycles(GRAPH) == []


def test_no_import_runs_back_up_or_sideways():
    def allowed(a: str, b: str) -> bool:
        return a == b or RANK[b] < RANK[a] or frozenset({a, b}) in SIBLINGS

    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                 if not allowed(_package(m), _package(t)))
    assert bad == []


@pytest.mark.parametrize("graph, cycles", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, []),
])
def test_the_cycle_finder_finds_cycles(graph, cycles):
    assert _cycles(graph) == cycles
