"""Each public module's ``__all__`` says what it offers, no more and no less (after httpx's
tests/test_exported_members.py).

For every module of the package that has an ``__all__`` (found by walking the package, so a new
module is checked without being listed here):

* every name in ``__all__`` exists (for :mod:`nbparallel.pipeline` that loads the lazy twins), once;
* every public name the module defines itself (a top-level ``def``, ``class`` or assignment, read
  from its source: imports do not count) is in ``__all__``, or in :data:`NOT_EXPORTED` with why;
* a package's ``__init__`` re-exports on purpose: every public object from nbparallel it binds
  (imported or defined, modules aside) is in ``__all__``.

The public packages must have an ``__all__``. An entry of :data:`NOT_EXPORTED` that no longer
matches anything fails too, so the list cannot go stale.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import nbparallel

#: Running it runs the command line; it defines nothing.
SKIP = {"nbparallel.__main__"}

#: Packages whose ``__init__`` is the public surface: they must declare it.
MUST_HAVE_ALL = {"nbparallel", "nbparallel.pipeline", "nbparallel.telemetry"}

#: Public names a module defines but deliberately does not export, with why. Module constants in
#: UPPER_CASE (timeouts, sizes, wire tags) are settings rather than API and need no entry: tests and
#: tools read or patch them as ``module.NAME``, ``from module import *`` does not want them.
NOT_EXPORTED: dict[str, dict[str, str]] = {
}

#: Known mismatches waiting for a fix, with why (none now). Fix the ``__all__`` (or rename the name
#: with a leading underscore) and delete the entry: a stale entry fails the test.
PENDING: dict[str, dict[str, str]] = {}

#: Names a package's ``__init__`` binds without re-exporting them (see PENDING for why).
PENDING_REEXPORTS: dict[str, set[str]] = {}


def _constant(name: str) -> bool:
    return name.isupper()


def _module_names() -> list[str]:
    names = ["nbparallel"]
    names += [m.name for m in pkgutil.walk_packages(nbparallel.__path__, "nbparallel.")
              if not any(part.startswith("_") for part in m.name.split("."))]
    return sorted(n for n in names if n not in SKIP)


MODULES = _module_names()


def _is_package(module: types.ModuleType) -> bool:
    return hasattr(module, "__path__")


def _defined(module: types.ModuleType) -> set[str]:
    """Names bound at the top level of the module's source by def, class or assignment."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text(encoding="utf-8"))
    names: set[str] = set()

    def targets(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)

    def visit(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(stmt.name)
            elif isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    targets(t)
            elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
                targets(stmt.target)
            elif isinstance(stmt, ast.If):
                visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                visit(stmt.body)
                visit(stmt.orelse)
                visit(stmt.finalbody)
                for handler in stmt.handlers:
                    visit(handler.body)
    visit(tree.body)
    return names


def _public(names: set[str]) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _load(name: str) -> types.ModuleType:
    module = importlib.import_module(name)
    if not hasattr(module, "__all__"):
        if name in MUST_HAVE_ALL:
            pytest.fail(f"{name} has no __all__")
        pytest.skip(f"{name} has no __all__")
    return module


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_exists_once(name):
    module = _load(name)
    exported = list(module.__all__)
    assert all(isinstance(n, str) for n in exported)
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists {missing}, which it does not have"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_defined_here_is_exported(name):
    module = _load(name)
    defined = {n for n in _public(_defined(module)) if not _constant(n)}
    allowed = {**NOT_EXPORTED.get(name, {}), **PENDING.get(name, {})}
    unexported = sorted(defined - set(module.__all__) - set(allowed))
    assert not unexported, (f"{name} defines {unexported} but its __all__ does not list them: export "
                            f"them, rename them with a leading underscore, or say why in NOT_EXPORTED")
    stale = sorted(n for n in allowed if n not in defined or n in module.__all__)
    assert not stale, (f"NOT_EXPORTED or PENDING[{name!r}] lists {stale}, which {name} no longer keeps "
                       f"to itself: delete the entry")


@pytest.mark.parametrize("name", [n for n in MODULES if _is_package(importlib.import_module(n))])
def test_a_package_exports_what_it_imports_from_nbparallel(name):
    module = _load(name)
    bound = {n for n, obj in vars(module).items()
             if not n.startswith("_") and not isinstance(obj, types.ModuleType)
             and (getattr(obj, "__module__", None) or "").startswith("nbparallel")}
    allowed = PENDING_REEXPORTS.get(name, set())
    unlisted = sorted(bound - set(module.__all__) - allowed)
    assert not unlisted, f"{name} binds {unlisted} without listing them in __all__"
    stale = sorted(n for n in allowed if n not in bound or n in module.__all__)
    assert not stale, f"PENDING_REEXPORTS[{name!r}] lists {stale}, which {name} now exports or lacks"


def test_the_exception_lists_name_modules_that_exist():
    assert not sorted((set(NOT_EXPORTED) | set(PENDING) | set(PENDING_REEXPORTS)) - set(MODULES))


def test_the_top_level_names_of_the_docs():
    from nbparallel.errors import RemoteFailure

    assert nbparallel.RemoteFailure is RemoteFailure
    for name in ("scatter", "pmap", "start", "connect", "stop", "current", "Pool", "Resident",
                 "NbparallelError", "UsageError", "PartitionError", "PoolError", "ControllerLost",
                 "RemoteError", "RemoteFailure", "PmapError", "load_ipython_extension"):
        assert name in nbparallel.__all__


def test_the_pipeline_twins_are_there_and_the_schedules_stay_pure():
    # In a fresh interpreter: this one has imported everything already.
    code = """if True:
        import sys
        import nbparallel.pipeline.schedule
        from nbparallel import pipeline
        # DESIGN's rule for the pure layer. (zmq is not in it: every Jupyter kernel has it loaded.)
        heavy = ("ipyparallel", "ipywidgets", "cupy")
        print(sorted(m for m in heavy if m in sys.modules))
        twins = [pipeline.stage, pipeline.run, pipeline.train, pipeline.show, pipeline.clear,
                 pipeline.Pipeline, pipeline.StageInfo, pipeline.RunResult]
        home = {t.__module__ for t in twins}  # the runtime, and wherever the twins live
        print(all(t is getattr(sys.modules[t.__module__], t.__name__) for t in twins),
              all(m.startswith("nbparallel.pipeline.") for m in home), "stage" in dir(pipeline))
        try:
            pipeline.no_such_twin
        except AttributeError as exc:
            print(exc)
    """
    env = {**os.environ, "PYTHONPATH": str(Path(nbparallel.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "True True True", "module 'nbparallel.pipeline' has no attribute 'no_such_twin'"]
