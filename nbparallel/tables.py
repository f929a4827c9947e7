"""Tables and labelled arrays: pandas, Arrow and xarray values split by rows, joined in rank order.

The pure half of scattering the data people have. A pandas ``DataFrame`` or ``Series`` and a
``pyarrow.Table`` split by rows, positionally, with ``numpy.array_split``'s boundaries (index,
dtypes and categories kept); an ``xarray.DataArray`` or ``Dataset`` splits along a dimension,
named or by position. Joining is ``pandas.concat`` / ``pyarrow.concat_tables`` /
``xarray.concat`` in rank order, so a gathered frame equals the one that was scattered.

``--by COLUMN`` instead hash-partitions the rows (:func:`by_key`): every key lands on exactly one
engine, so a ``groupby(COLUMN)`` in the cell is complete for the keys it sees. The hash is
pandas' ``hash_pandas_object`` (SipHash with pandas' fixed key), so the same key goes to the same
engine in every run, process and pandas release that keeps that function; a categorical key
hashes by its value, not its code. NaN keys hash alike and land together on one engine.

None of pandas, pyarrow or xarray is imported unless a value is one: the kind is read from the
type's module, as for CuPy.

>>> import pandas as pd
>>> [len(p) for p in (take(pd.DataFrame({"a": range(10)}), 0, a, b) for a, b in [(0, 4), (4, 10)])]
[4, 6]
"""

from __future__ import annotations

import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import PartitionError, UsageError

__all__ = ["TableMeta", "FrameSchema", "meta", "addresses", "schema", "joined_range", "frame", "kind", "is_table", "dim", "rows", "take", "take_rows", "take_each",
           "join", "reduce", "nbytes",
           "by_key", "skew_note", "REDUCIBLE"]

#: --reduce operations that mean something for frames (aligned on the index, as pandas does).
REDUCIBLE = ("sum", "prod", "min", "max")

_KINDS = {
    ("pandas", "DataFrame"): "DataFrame",
    ("pandas", "Series"): "Series",
    ("pyarrow", "Table"): "Table",
    ("xarray", "DataArray"): "DataArray",
    ("xarray", "Dataset"): "Dataset",
}


@dataclass(frozen=True)
class TableMeta:
    """What an engine reports of a table it keeps or returns: its kind, rows and bytes.

    ``rows`` is None for xarray values, whose split dimension the engine does not know."""

    kind: str
    rows: int | None
    nbytes: int
    schema: FrameSchema | None = None

    def __str__(self) -> str:
        return self.kind


@dataclass(frozen=True)
class FrameSchema:
    """A DataFrame whose columns and index are plain NumPy arrays, so that its gathered parts can
    be written by the engines straight into the joined frame's columns (``plane.py``).

    ``index`` is ``(start, stop, step)`` for a RangeIndex, else the index values' dtype."""

    columns: Any  # the pandas Index of column labels
    dtypes: tuple[np.dtype, ...]
    index: tuple[int, int, int] | np.dtype
    index_name: Any

    def fits(self, other: FrameSchema) -> bool:
        return (self.dtypes == other.dtypes and self.columns.equals(other.columns)
                and isinstance(self.index, tuple) == isinstance(other.index, tuple)
                and (isinstance(self.index, tuple) or self.index == other.index)
                and self.index_name == other.index_name)


def meta(value: Any) -> TableMeta:
    k = kind(value)
    return TableMeta(k, None if _labelled(value) else rows(value), nbytes(value),
                     schema(value) if k == "DataFrame" else None)


def schema(df: Any) -> FrameSchema | None:
    """The frame's :class:`FrameSchema`, or None when a column or the index is not plain NumPy."""
    dtypes = tuple(df.dtypes)
    if not all(isinstance(d, np.dtype) and not d.hasobject for d in dtypes):
        return None
    if not df.columns.is_unique or df.index.nlevels != 1:
        return None
    idx = df.index
    if type(idx).__name__ == "RangeIndex":
        where: tuple[int, int, int] | np.dtype = (idx.start, idx.stop, idx.step)
    elif isinstance(idx.dtype, np.dtype) and not idx.dtype.hasobject:
        where = idx.dtype
    else:
        return None
    return FrameSchema(df.columns, dtypes, where, idx.name)


def joined_range(schemas: Sequence[FrameSchema], counts: Sequence[int]) -> tuple[int, int] | None:
    """``(start, stop)`` when the parts' RangeIndexes follow on from each other in rank order."""
    if not all(isinstance(s.index, tuple) and s.index[2] == 1 for s in schemas):
        return None
    for s, nxt in zip(schemas, schemas[1:]):
        if s.index[1] != nxt.index[0]:
            return None
    return schemas[0].index[0], schemas[0].index[0] + sum(counts)


def frame(schema: FrameSchema, columns: Sequence[np.ndarray], index: Any) -> Any:
    """The joined DataFrame over ``columns`` (no copy); ``index`` is a (start, stop) range or
    the index values."""
    import pandas as pd

    if isinstance(index, tuple):
        index = pd.RangeIndex(*index, name=schema.index_name)
    else:
        index = pd.Index(index, name=schema.index_name, copy=False)
    out = pd.DataFrame(dict(enumerate(columns)), index=index, copy=False)
    out.columns = schema.columns
    return out


def kind(value: Any) -> str | None:
    """``"DataFrame"``, ``"Series"``, ``"Table"``, ``"DataArray"``, ``"Dataset"`` or None."""
    top = type(value).__module__.partition(".")[0]
    if top not in ("pandas", "pyarrow", "xarray"):
        return None
    for cls in type(value).__mro__:
        found = _KINDS.get((cls.__module__.partition(".")[0], cls.__name__))
        if found:
            return found
    return None


def is_table(value: Any) -> bool:
    return kind(value) is not None


def _labelled(value: Any) -> bool:
    return kind(value) in ("DataArray", "Dataset")


def dim(value: Any, axis: int | str, name: str) -> Any:
    """The row axis of ``value``: a dimension name for xarray, 0 for the others."""
    if _labelled(value):
        dims = list(value.dims)
        if isinstance(axis, str):
            if axis not in dims:
                raise PartitionError(
                    f"`{name}` has no dimension {axis!r}; its dimensions are "
                    f"{', '.join(map(repr, dims))}. Pass one of them to --axis."
                )
            return axis
        if not -len(dims) <= axis < len(dims):
            raise PartitionError(
                f"--axis {axis} is out of range for `{name}`, which has {len(dims)} dimension(s) "
                f"({', '.join(map(repr, dims))}); pass a dimension name to --axis."
            )
        return dims[axis]
    if isinstance(axis, str) or axis not in (0, -len(value.shape)):
        what = f"--axis {axis!r}" if isinstance(axis, str) else f"--axis {axis}"
        raise PartitionError(
            f"`{name}` is a {kind(value)}, which splits by rows only, not along {what}. "
            f"Drop --axis, or transpose it in the notebook first."
        )
    return 0


def rows(value: Any, axis: int | str = 0, name: str = "value") -> int:
    """The number of rows ``value`` splits into along ``axis``."""
    d = dim(value, axis, name)
    if _labelled(value):
        return int(value.sizes[d])
    return int(value.shape[0])


def take(value: Any, axis: int | str, start: int, stop: int, name: str = "value") -> Any:
    """Rows ``start:stop`` of ``value`` (views where the library gives them)."""
    k = kind(value)
    if k == "Table":
        return value.slice(start, stop - start)
    if k in ("DataArray", "Dataset"):
        return value.isel({dim(value, axis, name): slice(start, stop)})
    if k == "DataFrame" and value.columns.is_unique and value.shape[1] <= WIDE:
        return _column_slices(value, start, stop)
    return value.iloc[start:stop]


WIDE = 256  # columns; past this, building a frame column by column costs more than it saves


def _column_slices(df: Any, start: int, stop: int) -> Any:
    """``df.iloc[start:stop]`` made of one contiguous slice per column.

    A row slice of a consolidated block is strided, and pandas makes a strided block contiguous
    (a copy) when it is pickled; one 1-d slice per column is contiguous already, so a shard goes
    out of band with no copy but the one into shared memory. (pandas before 3.0 consolidates
    the columns here, which is the same one copy as before.)
    """
    import pandas as pd

    cols = {i: df.iloc[:, i].array[start:stop] for i in range(df.shape[1])}
    out = pd.DataFrame(cols, index=df.index[start:stop], copy=False)
    out.columns = df.columns
    out.attrs = dict(df.attrs)
    return out


def take_rows(value: Any, index: np.ndarray, axis: int | str = 0, name: str = "value") -> Any:
    """The rows of ``value`` at positions ``index``, in that order (a copy)."""
    k = kind(value)
    if k == "Table":
        return value.take(index)
    if k in ("DataArray", "Dataset"):
        return value.isel({dim(value, axis, name): index})
    if k is not None:
        return value.take(index)
    return np.take(np.asarray(value) if isinstance(value, (list, tuple)) else value, index,
                   axis=axis if isinstance(axis, int) else 0)


def nbytes(value: Any) -> int:
    """Bytes the value's buffers hold (object columns count their pointers only: cheap)."""
    k = kind(value)
    if k == "DataFrame":
        return int(value.memory_usage(index=True, deep=False).sum())
    if k == "Series":
        return int(value.memory_usage(index=True, deep=False))
    return int(getattr(value, "nbytes", 0) or 0)


def addresses(value: Any) -> list[int]:
    """Where the value's column buffers start in memory (NumPy and Arrow buffers; best effort).

    An engine uses this to tell which shared-memory segments a kept frame still reads."""
    k = kind(value)
    arrays: list[Any] = []
    if k == "DataFrame":
        arrays = [value.iloc[:, i].array for i in range(value.shape[1])] + [value.index.array]
    elif k == "Series":
        arrays = [value.array, value.index.array]
    elif k == "Table":
        arrays = list(value.columns)
    elif k == "DataArray":
        arrays = [value.variable.data, *(c.data for c in value.coords.values())]
    elif k == "Dataset":
        arrays = [v.data for v in value.variables.values()]
    out: list[int] = []
    for arr in arrays:
        out.extend(_addresses(arr))
    return out


def _addresses(arr: Any) -> list[int]:
    if isinstance(arr, np.ndarray):
        return [arr.__array_interface__["data"][0]]
    for attr in ("_ndarray", "codes"):  # NumpyExtensionArray, DatetimeArray; Categorical
        inner = getattr(arr, attr, None)
        if isinstance(inner, np.ndarray):
            return [inner.__array_interface__["data"][0]]
    chunked = arr.__arrow_array__() if hasattr(arr, "__arrow_array__") else arr
    chunks = getattr(chunked, "chunks", None)
    if chunks is None and hasattr(chunked, "buffers"):
        chunks = [chunked]
    return [b.address for c in chunks or () for b in c.buffers() if b is not None]


def join(values: Sequence[Any], axis: int | str, name: str, labels: Sequence[int]) -> Any:
    """Rank-order concatenation of tables of one kind (``partition.join`` checked that)."""
    k = kind(values[0])
    try:
        if k == "Table":
            import pyarrow as pa
            return pa.concat_tables(values)
        if k in ("DataArray", "Dataset"):
            import xarray as xr
            return xr.concat(values, dim=dim(values[0], axis, name))
        import pandas as pd
        if k == "DataFrame":
            # Column sets that differ would come back full of NaN without a word.
            cols = [tuple(v.columns) for v in values]
            if len(set(cols)) > 1:
                got = "; ".join(f"engine {e}: {list(c)}" for e, c in zip(labels, cols))
                raise PartitionError(
                    f"cannot gather `{name}`: the engines' frames have different columns ({got}). "
                    f"Give them the same columns, or --reduce {name}=list to get each one."
                )
        return pd.concat(values)
    except PartitionError:
        raise
    except Exception as exc:
        raise PartitionError(
            f"cannot gather `{name}` ({k}s from engines {', '.join(map(str, labels))}): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def reduce(op: str, values: Sequence[Any], name: str, labels: Sequence[int]) -> Any:
    """Combine per-engine frames or series row by row, aligned on the index.

    Rows with the same index label are combined, from whichever engines have them, as
    ``pandas.concat(values).groupby(level=...)`` would: per-engine partial aggregates (say
    ``df.groupby("k").sum()``) sum to the aggregate of the whole. xarray values combine
    elementwise, aligned on their coordinates.
    """
    k = kind(values[0])
    if k in ("DataArray", "Dataset"):
        ufunc = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}[op]
        return functools.reduce(ufunc, values)
    if k == "Table":
        raise PartitionError(
            f"cannot reduce `{name}` with {op}: Arrow tables have no elementwise {op}. Use "
            f"--gather {name} to join them, or return a pandas frame from the cell."
        )
    import pandas as pd
    whole = pd.concat(values)
    levels = list(range(whole.index.nlevels))
    try:
        return getattr(whole.groupby(level=levels, sort=True, dropna=False), op)()
    except Exception as exc:
        raise PartitionError(
            f"cannot reduce `{name}` with {op}: {type(exc).__name__}: {exc}. pandas could not "
            f"{op} the engines' {k}s row by row."
        ) from None


def by_key(values: dict[str, Any], column: str, n: int) -> tuple[list[np.ndarray], str]:
    """Row positions per engine so that every value of ``column`` lands on one engine.

    ``values`` are the scattered names; the first frame or table with ``column`` decides, and the
    others (of the same length) are split the same way. Rows keep their order on each engine.
    Returns the positions for each engine and the name the key came from.
    """
    owner = next((nm for nm, v in values.items() if _columns(v) and column in _columns(v)), None)
    if owner is None:
        tables = {nm: _columns(v) for nm, v in values.items() if kind(v) in ("DataFrame", "Table")}
        if not tables:
            got = ", ".join(f"`{nm}` is a {kind(v) or type(v).__name__}" for nm, v in values.items())
            raise UsageError(
                f"--by {column} hash-partitions the rows of a DataFrame or Arrow table by a "
                f"column, but {got or 'nothing is scattered'}. Scatter a table, or drop --by to "
                f"split by position."
            )
        has = "; ".join(f"`{nm}` has {', '.join(map(repr, cols[:20]))}"
                        + (" ..." if len(cols) > 20 else "") for nm, cols in tables.items())
        raise UsageError(f"--by {column}: no scattered table has a column {column!r} ({has}).")
    hashes = _hashes(_key_column(values[owner], column))
    part = hashes % np.uint64(n)
    if n <= 16:  # a pass per engine beats a sort of all rows
        return [np.flatnonzero(part == r) for r in range(n)], owner
    order = np.argsort(part, kind="stable")
    counts = np.bincount(part.astype(np.int64), minlength=n)
    return np.split(order, np.cumsum(counts)[:-1]), owner


def take_each(value: Any, positions: Sequence[np.ndarray], axis: int | str = 0,
              name: str = "value") -> list[Any]:
    """:func:`take_rows` for each engine's positions, on threads when there are many rows."""
    if sum(len(p) for p in positions) < 2 * HASH_CHUNK:
        return [take_rows(value, p, axis, name) for p in positions]
    with ThreadPoolExecutor(min(len(positions), os.cpu_count() or 1)) as threads:
        return list(threads.map(lambda p: take_rows(value, p, axis, name), positions))


HASH_CHUNK = 1 << 20  # rows per thread's piece: hashing is elementwise, so pieces agree with the whole


def _hashes(keys: Any) -> np.ndarray:
    """pandas' stable hash of every key, in pieces on threads (NumPy and pandas release the GIL)."""
    import pandas as pd

    def one(piece: Any) -> np.ndarray:
        return pd.util.hash_pandas_object(piece, index=False, categorize=True).to_numpy()

    if len(keys) < 2 * HASH_CHUNK:
        return one(keys)
    pieces = [keys.iloc[i:i + HASH_CHUNK] for i in range(0, len(keys), HASH_CHUNK)]
    with ThreadPoolExecutor(min(len(pieces), os.cpu_count() or 1)) as threads:
        return np.concatenate(list(threads.map(one, pieces)))


def _columns(value: Any) -> list[str]:
    k = kind(value)
    if k == "DataFrame":
        return [c for c in value.columns]
    if k == "Table":
        return list(value.column_names)
    return []


def _key_column(value: Any, column: str) -> Any:
    if kind(value) == "Table":
        if importlib.util.find_spec("pandas") is None:  # the hash is pandas'
            raise UsageError(
                "--by on an Arrow table hashes its key column with pandas, which is not "
                "installed; pip install pandas."
            )
        return value.column(column).to_pandas()
    return value[column]


def skew_note(counts: Sequence[int], engines: Sequence[int], column: str) -> str | None:
    """A line for the user when one engine got far more rows than its share, else None."""
    total = sum(counts)
    if total < 1000 or len(counts) < 2:
        return None
    fair = total / len(counts)
    worst = max(range(len(counts)), key=lambda i: counts[i])
    if counts[worst] < 1.5 * fair:
        return None
    return (f"note: --by {column} put {counts[worst]:,} of {total:,} rows "
            f"({counts[worst] / total:.0%}) on engine {engines[worst]}, where an even share is "
            f"{fair:,.0f}: a few keys hold most rows, and that engine sets the pace.")
