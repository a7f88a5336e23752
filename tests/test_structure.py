"""The structure stays as drawn: no import cycle between labscale's top-level packages (counting imports inside
functions too — a lazy import is still a dependency), none between the report's modules, none at module level
anywhere, and no module reaching for another package's private names."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import labscale

ROOT = Path(labscale.__file__).parent


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(module imported, names imported from it) for every absolute labscale import."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("labscale"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("labscale")]
    return found


def _unit(module: str) -> str:
    """The top-level package (or module) a module belongs to: labscale.engine.plan -> engine."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "labscale"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _graph(top_level_only: bool, key) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, tree in _modules().items():
        for target, _ in _imports(tree, top_level_only):
            a, b = key(name), key(target)
            if a is not None and b is not None and a != b:
                graph[a].add(b)
    return graph


def test_no_cycle_between_top_level_packages():
    cycle = _cycle(_graph(False, _unit))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_no_cycle_between_report_modules():
    def in_report(m: str):
        return m if m.startswith("labscale.report.") else None

    cycle = _cycle(_graph(False, in_report))
    assert cycle is None, " -> ".join(cycle)


def test_no_module_level_cycle_anywhere():
    cycle = _cycle(_graph(True, lambda m: m))
    assert cycle is None, " -> ".join(cycle)


def test_no_private_name_imported_from_another_package():
    offenders = []
    for name, tree in _modules().items():
        for target, names in _imports(tree, False):
            if _unit(target) != _unit(name):
                offenders += [f"{name} imports {target}.{n}" for n in names if n.startswith("_")]
    assert not offenders, offenders


def test_the_checks_catch_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
