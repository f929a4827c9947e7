"""Splitting values across engines and joining results back: pure, no cluster needed.

Boundaries are exactly ``numpy.array_split``'s: with ``L`` rows over ``n`` engines the first
``L % n`` engines get ``L // n + 1`` rows, the rest ``L // n``. Lists and tuples split the same way.
pandas frames and series, Arrow tables and xarray values split by rows too (``tables.py``).
A halo of ``k`` adds up to ``k`` neighbouring rows on each side (fewer at the ends); the shard says
how many it got, so a stencil can trim them.

>>> [len(s.value) for s in split(list(range(10)), 3)]
[4, 3, 3]
>>> split(list(range(10)), 3, halo=1)[1].halo
(1, 1)
"""

from __future__ import annotations

import functools
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import tables
from .errors import PartitionError, UsageError
from .format import parse_ranges

__all__ = [
    "Shard",
    "REDUCE_OPS",
    "bounds",
    "length",
    "split",
    "join",
    "reduce",
    "parse_engines",
]


@dataclass(frozen=True)
class Shard:
    """One engine's piece: ``value`` includes the halo rows; ``start:stop`` is the owned range."""

    value: Any
    start: int
    stop: int
    halo: tuple[int, int] = (0, 0)


def _is_array(value: Any) -> bool:
    # CuPy and other array libraries quack like NumPy here; checking attributes avoids importing them.
    # A Series or DataArray quacks too, but has an index to keep: tables.py handles those.
    return isinstance(value, np.ndarray) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__getitem__")
        and not tables.is_table(value)
    )


def bounds(n_rows: int, n_parts: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each part, identical to ``numpy.array_split``."""
    base, extra = divmod(n_rows, n_parts)
    out, start = [], 0
    for i in range(n_parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _normalize_axis(value: Any, axis: int | str, name: str) -> int | str:
    if tables.is_table(value):
        return tables.dim(value, axis, name)
    if isinstance(axis, str):
        raise PartitionError(
            f"--axis {axis!r} names a dimension, which only xarray values have; `{name}` is a "
            f"{type(value).__name__}: give --axis a number."
        )
    if _is_array(value):
        ndim = len(value.shape)
        if ndim == 0:
            raise PartitionError(
                f"`{name}` is a 0-d array (a single number) and cannot be split across engines; "
                f"send it whole with --broadcast {name}."
            )
        if not -ndim <= axis < ndim:
            raise PartitionError(
                f"--axis {axis} is out of range for `{name}`, which has {ndim} dimension(s) "
                f"(shape {tuple(value.shape)}); use an axis from {-ndim} to {ndim - 1}."
            )
        return axis % ndim
    if isinstance(value, (list, tuple)):
        if axis not in (0, -1):
            raise PartitionError(
                f"`{name}` is a {type(value).__name__}, which can only be split along axis 0, "
                f"not --axis {axis}; convert it with numpy.asarray to split along another axis."
            )
        return 0
    hint = {dict: f" To split its items, scatter list({name}.items()) or pandas.DataFrame({name}).",
            str: " A string is one value."}.get(type(value), "")
    raise PartitionError(
        f"`{name}` is a {type(value).__name__}, which cannot be split across engines; scatter "
        f"arrays, lists, tuples, pandas frames, Arrow tables or xarray values, or send `{name}` "
        f"whole with --broadcast {name}.{hint}"
    )


def length(value: Any, axis: int | str = 0, name: str = "value") -> int:
    """Number of rows of ``value`` along ``axis`` (raises PartitionError if it cannot be split)."""
    axis = _normalize_axis(value, axis, name)
    if tables.is_table(value):
        return tables.rows(value, axis, name)
    return int(value.shape[axis]) if _is_array(value) else len(value)


def _take(value: Any, axis: int | str, start: int, stop: int) -> Any:
    if tables.is_table(value):
        return tables.take(value, axis, start, stop)
    if _is_array(value):
        index = (slice(None),) * axis + (slice(start, stop),)
        return value[index]
    return value[start:stop]


def split(value: Any, n: int, axis: int | str = 0, halo: int = 0, name: str = "value") -> list[Shard]:
    """Split ``value`` into ``n`` shards along ``axis``, each with up to ``halo`` extra rows a side.

    Array shards are views (no copy). Raises :class:`PartitionError` for values that cannot be
    split, an empty value, or fewer rows than engines.
    """
    if n < 1:
        raise UsageError("need at least one engine to split across")
    if halo < 0:
        raise UsageError(f"--halo must be 0 or more, not {halo}.")
    ax = _normalize_axis(value, axis, name)
    rows = length(value, ax, name)
    if rows == 0:
        raise PartitionError(
            f"`{name}` is empty along axis {ax}; there is nothing to scatter. Check how it was built."
        )
    if rows < n:
        raise PartitionError(
            f"`{name}` has {rows} row(s) along axis {ax} but the cell would run on {n} engines, "
            f"so some would get nothing. Use fewer engines, e.g. --engines 0-{rows - 1}."
        )
    shards = []
    for start, stop in bounds(rows, n):
        lo, hi = min(halo, start), min(halo, rows - stop)
        shards.append(Shard(_take(value, ax, start - lo, stop + hi), start, stop, (lo, hi)))
    return shards


def _kind(value: Any) -> str:
    if tables.is_table(value):
        return tables.kind(value)
    if isinstance(value, numbers.Number):
        return "number"
    if _is_array(value):
        return "array"
    if isinstance(value, list):
        return "list"
    if isinstance(value, tuple):
        return "tuple"
    return type(value).__name__


def _one_kind(values: Sequence[Any], labels: Sequence[int], doing: str) -> str:
    """The one kind every engine's value has; two kinds are a PartitionError naming them."""
    kinds = {_kind(v) for v in values}
    if len(kinds) > 1:
        got = ", ".join(f"engine {e}: {_kind(v)}" for e, v in zip(labels, values))
        raise PartitionError(
            f"cannot {doing}: engines returned different kinds of value ({got}). "
            f"Make the cell produce the same type on every engine."
        )
    return kinds.pop()


def join(values: Sequence[Any], axis: int | str = 0, name: str = "value",
         labels: Sequence[int] | None = None) -> Any:
    """Join per-engine values in rank order: concatenate arrays along ``axis``, lists end to end,
    tables with their library's concat."""
    labels = list(labels) if labels is not None else list(range(len(values)))
    kind = _one_kind(values, labels, f"gather `{name}`")
    if tables.is_table(values[0]):
        return tables.join(values, axis, name, labels)
    if isinstance(axis, str):
        raise PartitionError(
            f"cannot gather `{name}` along {axis!r}: a dimension name needs xarray values, and "
            f"the engines returned {kind} values."
        )
    if kind == "number" or (kind == "array" and np.ndim(values[0]) == 0):
        raise PartitionError(
            f"cannot gather `{name}`: each engine returned a single number, which has no axis "
            f"to join along. Use --reduce {name}=list for one value per engine, or "
            f"--reduce {name}=sum to combine them."
        )
    if kind == "array":
        arrays = [np.asarray(v) for v in values]
        try:
            return np.concatenate(arrays, axis=axis)
        except (ValueError, np.exceptions.AxisError) as exc:
            shapes = ", ".join(f"engine {e}: {a.shape}" for e, a in zip(labels, arrays))
            raise PartitionError(
                f"cannot gather `{name}` along axis {axis}: the shapes do not fit together "
                f"({shapes}); {exc}. Every dimension except axis {axis} must match."
            ) from None
    if kind == "list":
        return [x for v in values for x in v]
    if kind == "tuple":
        return tuple(x for v in values for x in v)
    raise PartitionError(
        f"cannot gather `{name}`: engines returned {kind} values, and only arrays, lists and "
        f"tuples can be joined. Use --reduce {name}=list to get one value per engine."
    )


def _elementwise(op: Callable[[Any, Any], Any], ufunc: np.ufunc) -> Callable[..., Any]:
    def run(values: Sequence[Any], axis: int, name: str, labels: Sequence[int], opname: str) -> Any:
        if any(_is_array(v) for v in values):
            shapes = [np.shape(v) for v in values]
            if len(set(shapes)) > 1:
                got = ", ".join(f"engine {e}: {s}" for e, s in zip(labels, shapes))
                raise PartitionError(
                    f"cannot reduce `{name}` with {opname}: engines returned different shapes "
                    f"({got}). An elementwise reduce needs the same shape everywhere; use "
                    f"--gather {name} to join pieces instead."
                )
            return functools.reduce(ufunc, values)
        try:
            return functools.reduce(op, values)
        except TypeError as exc:
            raise PartitionError(
                f"cannot reduce `{name}` with {opname}: {exc}. The engines returned "
                f"{', '.join(sorted({type(v).__name__ for v in values}))}."
            ) from None
    return run


REDUCE_OPS: dict[str, Callable[..., Any]] = {
    "sum": _elementwise(operator.add, np.add),
    "prod": _elementwise(operator.mul, np.multiply),
    "min": _elementwise(min, np.minimum),
    "max": _elementwise(max, np.maximum),
    "concat": lambda values, axis, name, labels, opname: join(values, axis, name, labels),
    "list": lambda values, axis, name, labels, opname: list(values),
}


def reduce(op: str, values: Sequence[Any], axis: int | str = 0, name: str = "value",
           labels: Sequence[int] | None = None) -> Any:
    """Combine per-engine values with one of :data:`REDUCE_OPS` (elementwise for arrays; pandas
    values aligned on their index, see :func:`nbparallel.tables.reduce`)."""
    if op not in REDUCE_OPS:
        raise UsageError(
            f"unknown reduce operation {op!r} for `{name}`; use one of {', '.join(REDUCE_OPS)}, "
            f"as in --reduce {name}=sum."
        )
    labels = list(labels) if labels is not None else list(range(len(values)))
    values = list(values)
    if op in tables.REDUCIBLE and any(tables.is_table(v) for v in values):
        _one_kind(values, labels, f"reduce `{name}` with {op}")
        return tables.reduce(op, values, name, labels)
    return REDUCE_OPS[op](values, axis, name, labels, op)


def parse_engines(spec: str) -> list[int]:
    """Parse an engine list such as ``"0-3,6"`` into ``[0, 1, 2, 3, 6]`` (never evaluated).

    The one range grammar is :func:`nbparallel.format.parse_ranges`; this names it for ``--engines``.

    >>> parse_engines("0-3,6")
    [0, 1, 2, 3, 6]
    """
    return parse_ranges(spec, "--engines", item="an engine id")
