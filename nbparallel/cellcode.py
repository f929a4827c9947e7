"""A cell's code as engines will run it: syntax checked here, free names found and packed.

A parallel cell should behave like a local cell, so the notebook names it reads (functions,
classes, modules, small values) travel with it. Values are serialized with cloudpickle, which
sends functions and classes defined in the notebook by value and modules by name. Anything larger
than ``AUTO_SEND_LIMIT`` is refused, because copying it silently to every engine is rarely what the
user wants: they are told to ``--broadcast`` or scatter it instead.
"""

from __future__ import annotations

import ast
import builtins
import functools
import symtable
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import cloudpickle

from .errors import UsageError
from . import format as fmt

__all__ = [
    "AUTO_SEND_LIMIT", "CellCode", "analyse", "parse_cell", "compile_cell", "free_names",
    "pack_names", "unpack_names",
]

#: Bytes above which a notebook value read by a cell is not sent automatically (10 MiB).
AUTO_SEND_LIMIT = 10 * 1024 * 1024


@dataclass(frozen=True)
class CellCode:
    """Source checked for syntax, with the name engines report in tracebacks."""

    source: str
    filename: str
    result_expr: bool = False  # the last statement is an expression whose value is the result


def _syntax_error(kind: str, exc: SyntaxError, offset: int = 0) -> UsageError:
    line = (exc.text or "").rstrip("\n")
    pointer = ""
    if line and exc.offset:
        pointer = "\n    " + " " * (exc.offset - 1) + "^"
    lineno = (exc.lineno or 0) - offset
    return UsageError(
        f"the {kind} has a syntax error on line {lineno}: {exc.msg}\n    {line}{pointer}\n"
        f"Nothing was sent to the engines; fix the line and run the cell again."
    )


def parse_cell(source: str, kind: str, *, result: bool = False) -> tuple[CellCode, ast.Module]:
    """Check a cell's syntax before anything is sent; ``result`` marks a last-expression value."""
    try:
        tree = ast.parse(source, filename=f"<{kind}>", mode="exec")
    except SyntaxError as exc:
        raise _syntax_error(kind, exc) from None
    result_expr = result and bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    return CellCode(source, f"<{kind}>", result_expr), tree


@functools.lru_cache(maxsize=256)
def analyse(source: str, kind: str, result: bool = False) -> tuple[CellCode, frozenset[str]]:
    """:func:`parse_cell` and :func:`free_names` of one cell, remembered: a notebook runs the
    same cell again and again (a loop, a re-run), and the analysis costs a millisecond or two,
    about what the engines take to run a small cell."""
    cell, tree = parse_cell(source, kind, result=result)
    return cell, frozenset(free_names(tree, source))


RESULT_NAME = "__nbparallel_result__"


@functools.lru_cache(maxsize=256)
def compile_cell(cell: CellCode) -> Any:
    """Compile on the engine; a last expression is assigned to ``RESULT_NAME`` (remembered,
    since the same cell comes again: each chunk of a map, each step of a loop)."""
    tree = ast.parse(cell.source, filename=cell.filename, mode="exec")
    if cell.result_expr:
        last = tree.body[-1]
        assign = ast.Assign(targets=[ast.Name(RESULT_NAME, ast.Store())], value=last.value)
        tree.body[-1] = ast.copy_location(assign, last)
        ast.fix_missing_locations(tree)
    return compile(tree, cell.filename, "exec")


def free_names(tree: ast.AST, source: str | None = None) -> set[str]:
    """Names a cell reads that it might not define itself (an over-approximation is harmless).

    Scopes are Python's own (``symtable``): a function's parameters and locals are not the
    notebook's, so ``def forward(x, ctx)`` does not ship the notebook's ``x``. ``source``, when
    given, is the text ``tree`` was parsed from (saves writing it out again).
    """
    names: set[str] = set()
    text = ast.unparse(tree) if source is None else source
    tables = [symtable.symtable(text, "<cell>", "exec")]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        module = table.get_type() == "module"
        for sym in table.get_symbols():
            if module and sym.is_referenced():
                names.add(sym.get_name())  # even if assigned: `x = x + 1` reads it first
            elif not module and sym.is_global() and (sym.is_referenced() or sym.is_assigned()):
                names.add(sym.get_name())
    # symtable does not count `total += 1` as a read, but it reads the notebook's total.
    names.update(node.target.id for node in ast.walk(tree)
                 if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name))
    return names - set(dir(builtins))


def pack_names(
    names: Iterable[str],
    namespace: Mapping[str, Any],
    *,
    skip: Iterable[str] = (),
    limit: int = AUTO_SEND_LIMIT,
    too_big: str = "",
) -> bytes:
    """Serialize the notebook values of ``names`` that exist in ``namespace``.

    Names in ``skip`` (scattered, broadcast or provided by the runner) and names the namespace
    lacks are left out; a missing name then fails on the engine with the usual NameError.
    """
    skipped = set(skip)
    chosen: dict[str, Any] = {}
    for name in sorted(set(names) - skipped):
        if name not in namespace or name.startswith("__"):
            continue
        value = namespace[name]
        nbytes = getattr(value, "nbytes", None)
        if isinstance(nbytes, int) and nbytes > limit:
            raise _too_big(name, nbytes, limit, too_big)
        chosen[name] = value
    blobs = {}
    for name, value in chosen.items():
        try:
            blob = cloudpickle.dumps(value)
        except Exception as exc:  # pickling can fail in many ways, all of them user-facing
            raise UsageError(
                f"the cell reads `{name}` from the notebook, but it cannot be sent to engines: "
                f"{type(exc).__name__}: {exc}. Create it inside the cell instead (for example "
                f"open files or connections there), or pass what it holds as plain data."
            ) from None
        if len(blob) > limit:
            raise _too_big(name, len(blob), limit, too_big)
        blobs[name] = blob
    return cloudpickle.dumps(blobs)


def _too_big(name: str, size: int, limit: int, advice: str) -> UsageError:
    advice = advice.format(name=name) or (
        f"Say how it should travel: --broadcast {name} sends a full copy to every engine, or "
        f"list it before the options to split it across engines.")
    return UsageError(
        f"the cell reads `{name}` ({fmt.nbytes(size)}) from the notebook, which is over the "
        f"{fmt.nbytes(limit)} limit for sending names automatically. {advice}"
    )


def unpack_names(blob: bytes) -> dict[str, Any]:
    """Engine side of :func:`pack_names`."""
    return {name: cloudpickle.loads(b) for name, b in cloudpickle.loads(blob).items()}
