"""The import rules of docs/architecture.md (Import rules), read from the source with ``ast``.

The client, the service and training live in different environments, and share only the core
(``rmserve/*.py``). Here every ``import`` statement of the package is read, wherever it
stands (a lazy import inside a function counts too):

- ``rmserve.training`` never imports ``rmserve.service``, nor the service training;
- the client imports neither (nor the core beyond the version), the core none of the three;
- the core's module-level imports are the standard library, but for the two modules that
  need numpy (``packing.py`` and ``activations.py``, used by training and the service only);
- no module imports, even lazily or for type checking only, a module that imports it back
  (no import cycle: each module can be read, and changed, before the ones that use it);
- the export package is layered (:data:`EXPORT_LAYERS`): a module imports none of a higher
  layer, the modules beside the layers none of them, and ``options.py`` only the standard
  library and the core (``rmserve --help`` builds the export flags from it).
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
    assert "rmserve.training.export.bundle" in graph
    assert _cycles(graph) == []
    # The check finds one: a module and its importer importing each other back.
    graph["rmserve.training.export.onnx_files"].add("rmserve.training.export.fusion")
    cycle = ["rmserve.training.export.fusion", "rmserve.training.export.onnx_files"]
    assert cycle in _cycles(graph)


EXPORT = "rmserve.training.export"
# The export package's layers, bottom first: what export decides before it writes (and what
# it can be asked), the graph, its checks, the variants derived from it, the bundle. A module
# may import its own layer or lower ones, never a higher one.
EXPORT_LAYERS = (("options", "plan", "memory"), ("graph",), ("checks",), ("variants",), ("bundle",))
# Beside the layers, used by them and importing none of them (they may use each other:
# fusion and quantize write through onnx_files).
EXPORT_BESIDE = ("quantize", "fusion", "packed", "onnx_files", "staging")


def _export_violations(graph: dict[str, set[str]]) -> set[str]:
    """``module -> import`` for each import that breaks the export package's layering."""
    level = {f"{EXPORT}.{m}": i for i, layer in enumerate(EXPORT_LAYERS) for m in layer}
    wrong = set()
    for name in [*level, *(f"{EXPORT}.{m}" for m in EXPORT_BESIDE)]:
        for dep in graph[name]:
            above = dep in level and (name not in level or level[dep] > level[name])
            if above or dep == EXPORT:  # the package itself imports the layers
                wrong.add(f"{name} -> {dep}")
    return wrong


def test_the_export_package_is_layered() -> None:
    graph = _import_graph()
    modules = {n.removeprefix(f"{EXPORT}.") for n in graph if n.startswith(f"{EXPORT}.")}
    # Every module of the package has its place (a new one is placed here first).
    assert modules == {m for layer in EXPORT_LAYERS for m in layer} | set(EXPORT_BESIDE)
    assert _export_violations(graph) == set()
    # options.py: the standard library and the core only, lazy imports included.
    wrong = set()
    for name in _imports(PACKAGE / "training" / "export" / "options.py"):
        top = name.split(".")[0]
        core = top == "rmserve" and not name.startswith(
            ("rmserve.service", "rmserve.training", "rmserve.client")
        )
        if not core and top not in sys.stdlib_module_names:
            wrong.add(name)
    assert not wrong
    # The check finds a lower layer importing a higher one, and a module beside the layers
    # importing one.
    graph[f"{EXPORT}.graph"].add(f"{EXPORT}.checks")
    graph[f"{EXPORT}.packed"].add(f"{EXPORT}.plan")
    assert _export_violations(graph) == {
        f"{EXPORT}.graph -> {EXPORT}.checks",
        f"{EXPORT}.packed -> {EXPORT}.plan",
    }


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rmserve.service import app\n    import torch\n")
    assert _imports(bad) == {"rmserve.service", "torch"}
    assert _imports(bad, module_level_only=True) == set()
