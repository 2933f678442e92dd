"""The package layering: launcher → engine → modeling / datapipes, never upward or sideways, and no import
circle inside or across packages (imports inside functions count: a local import is still a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "modeling", "datapipes")
# What each package may import of ours; anything else of ours is a layering break.
ALLOWED = {
    "engine": {"engine", "modeling", "datapipes"},
    "modeling": {"modeling"},
    "datapipes": {"datapipes"},
}
OURS = {*PACKAGES, "launcher"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names, top level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    modules = _sources()
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [*path, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_modules_import_each_other_without_a_circle():
    cycle = _cycle(_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_only_go_down_the_layers(package):
    for path in (REPO / package).rglob("*.py"):
        ours = {name.split(".")[0] for name in _imports(path)} & OURS
        assert ours <= ALLOWED[package], f"{path.relative_to(REPO)} imports {sorted(ours - ALLOWED[package])}"


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
