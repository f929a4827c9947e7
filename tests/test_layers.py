"""The package's shape, read from its source: no import cycle, and each outside API in its place.

DESIGN.md's rules, checked so they cannot drift: imports point down only (so there is no cycle,
counting imports inside functions too), only ``pool.py`` and ``engine/`` import ipyparallel, only
``widgets/`` imports ipywidgets, and the transport names are written once (in
``dataplane/transport.py``), never as string literals in the modules that use them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nbparallel"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, at the top or inside a function; TYPE_CHECKING excluded."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return found


GRAPH = {name: {m for m in _imports(name) if m in MODULES and m != name} for name in MODULES}


def _cycles() -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    # A package's __init__ that imports its own submodules is not a cycle with them.
    cycles = [c for c in _cycles()
              if not all(m.startswith(min(c, key=len) + ".") or m == min(c, key=len) for m in c)]
    assert cycles == []


def _users(prefix: str) -> set[str]:
    return {name for name in MODULES
            if any(m == prefix or m.startswith(prefix + ".") for m in _imports(name))}


def test_only_the_pool_and_the_engine_side_know_ipyparallel():
    users = _users("ipyparallel")
    assert users, "the check found no user of ipyparallel at all: it reads nothing"
    assert {u for u in users if u != "nbparallel.pool" and not u.startswith("nbparallel.engine")} == set()


def test_only_widgets_import_ipywidgets():
    assert {u for u in _users("ipywidgets") if not u.startswith("nbparallel.widgets")} == set()


def test_cupy_is_imported_in_one_place():
    assert _users("cupy") <= {"nbparallel.gpu"}


@pytest.mark.parametrize("library", ["pandas", "pyarrow", "xarray"])
def test_table_libraries_are_imported_in_one_place(library):
    assert _users(library) <= {"nbparallel.tables"}


PURE = ["nbparallel.partition", "nbparallel.tables", "nbparallel.cellcode", "nbparallel.format", "nbparallel.errors",
        "nbparallel.pipeline.schedule", "nbparallel.telemetry.records", "nbparallel.telemetry.reduce",
        "nbparallel.telemetry.trace", "nbparallel.dataplane.transport", "nbparallel.precision",
        "nbparallel.pipeline.layout", "nbparallel.telemetry.history"]


@pytest.mark.parametrize("name", PURE)
def test_the_pure_layer_imports_only_the_pure_layer(name):
    inside = GRAPH[name] - {"nbparallel", "nbparallel.telemetry", "nbparallel.pipeline",
                            "nbparallel.dataplane"}
    assert inside <= set(PURE), f"{name} imports {sorted(inside - set(PURE))}"


TRANSPORT_LITERAL = re.compile(r"""(?<![\w-])["'](shm|direct|ipp|cuda-ipc)["']""")


def test_transport_names_are_written_once():
    # Docstrings and comments may name them; code compares against the constants.
    where = []
    for name, path in MODULES.items():
        if name in ("nbparallel.dataplane.transport",):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and id(node) not in docs
                    and node.value in ("shm", "direct", "ipp", "cuda-ipc")):
                where.append(f"{name}:{node.lineno} {node.value!r}")
    assert where == []
