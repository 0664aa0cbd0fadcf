"""The import rules of docs/architecture.md (Import rules), read from the source with ``ast``.

The client, the service and training live in different environments, and share only the core
(``rmserve/*.py``). Here every ``import`` statement of the package is read, wherever it
stands (a lazy import inside a function counts too):

- ``rmserve.training`` never imports ``rmserve.service``, nor the service training;
- the client imports neither (nor the core beyond the version), the core none of the three;
- the core's module-level imports are the standard library, but for the two modules that
  need numpy (``packing.py`` and ``activations.py``, used by training and the service only);
- no module imports, even lazily or for type checking only, a module that imports it back
  (no import cycle: each module can be read, and changed, before the ones that use it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rmserve"
CORE_THIRD_PARTY = {"packing.py": {"numpy"}, "activations.py": {"numpy"}}


def _imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    """The modules ``path`` imports (``from x import y`` gives ``x``)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("training", ("rmserve.service", "rmserve.client")),
        ("service", ("rmserve.training", "rmserve.client")),
        ("client", ("rmserve.service", "rmserve.training")),
    ],
)
def test_the_parts_do_not_import_each_other(folder: str, forbidden: tuple[str, ...]) -> None:
    wrong = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in _files(folder)
        for name in _imports(path)
        if name.startswith(forbidden)
    }
    assert not wrong


def test_the_core_imports_the_standard_library_at_module_level() -> None:
    core = [p for p in PACKAGE.glob("*.py") if p.name not in ("cli.py", "__main__.py")]
    assert {p.name for p in core} >= {"manifest.py", "formatting.py", "encoding.py", "packing.py"}
    wrong = set()
    for path in core:
        allowed = CORE_THIRD_PARTY.get(path.name, set())
        for name in _imports(path, module_level_only=True):
            top = name.split(".")[0]
            if top == "rmserve":
                if name.startswith(("rmserve.service", "rmserve.training", "rmserve.client")):
                    wrong.add(f"{path.name}: {name}")
            elif top not in sys.stdlib_module_names and top not in allowed:
                wrong.add(f"{path.name}: {name}")
    assert not wrong


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """rmserve module -> the rmserve modules it imports (``from a import b`` names ``a.b``
    when that is a module)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycle() -> None:
    graph = _import_graph()
    assert "rmserve.training.export" in graph
    assert _cycles(graph) == []
    # The check finds one: a module and its importer importing each other back.
    graph["rmserve.training.packed"].add("rmserve.training.export")
    assert ["rmserve.training.export", "rmserve.training.packed"] in _cycles(graph)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rmserve.service import app\n    import torch\n")
    assert _imports(bad) == {"rmserve.service", "torch"}
    assert _imports(bad, module_level_only=True) == set()
