"""Handles to shards left on the engines by ``%%scatter ... --keep NAME``.

::

    %%scatter x --keep y
    y = x * 2                 # y's shards stay on the engines; the notebook gets a handle

    y                         # <Resident y: (1000000,) float64, 7.6 MiB on engines 0-1, axis 0>
    %%scatter y --gather s    # the shards are used where they are: no bytes move
    s = y.sum(keepdims=True)
    np.asarray(y)             # gathers the whole array into the notebook

A handle frees its shards when it is deleted (with the next call to those engines) or when the
pool stops; ``handle.free()`` does it explicitly.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import numpy as np

from .dataplane.plane import Job
from .dataplane.remote import Source
from .errors import PoolError
from .tables import TableMeta
from .format import nbytes, ranges
from .widgets.placement import Placement

__all__ = ["Resident"]


class Resident:
    """Shards of one value kept on the engines, one per rank, split along ``axis``."""

    def __init__(self, plane: Any, name: str, key: str, engines: Sequence[int],
                 metas: Sequence[tuple[Any, str]], axis: int, transport: str = "auto"):
        self.name = name
        self.transport = transport
        self.key = key
        self.engines = list(engines)
        self.axis = axis
        self.metas = [(tuple(s) if s is not None else None, d) for s, d in metas]
        self._plane = weakref.ref(plane)
        self._finalizer = weakref.finalize(self, _free, self._plane, self.engines, key)

    # -- what it is ----------------------------------------------------------------------------
    @property
    def is_array(self) -> bool:
        return all(s is not None for s, _ in self.metas)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The joined shape, or None when the shards are not arrays that join along ``axis``."""
        if not self.is_array or len({d for _, d in self.metas}) != 1:
            return None
        shapes = [s for s, _ in self.metas]
        if any(len(s) <= self.axis for s in shapes):
            return None
        if len({s[:self.axis] + s[self.axis + 1:] for s in shapes}) != 1:
            return None
        shape = list(shapes[0])
        shape[self.axis] = sum(s[self.axis] for s in shapes)
        return tuple(shape)

    @property
    def is_table(self) -> bool:
        """Shards that are frames or Arrow tables whose rows the engines counted."""
        return all(isinstance(d, TableMeta) and d.rows is not None for _, d in self.metas)

    @property
    def length(self) -> int | None:
        """Rows along ``axis``, all shards together (None when they are not counted)."""
        rows = [p["rows"] for p in self.placement()]
        return None if any(r is None for r in rows) else rows[-1][1]

    @property
    def dtype(self) -> np.dtype | None:
        return np.dtype(self.metas[0][1]) if self.is_array else None

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize if s is not None
                   else d.nbytes if isinstance(d, TableMeta) else 0 for s, d in self.metas)

    def placement(self) -> Placement:
        """Where each shard lives: engine, rank, rows along ``axis``, bytes, the engine's
        ``device`` where the pool knows it, and ``lost`` (its engine stopped). A list of those
        dicts that draws itself in a notebook (a bar of the rows) and prints as text."""
        plane = self._plane()
        pool = plane.pool if plane is not None and not plane.closed else None
        live = set(pool.alive(self.engines)) if pool is not None else None
        rows, lo = [], 0
        for rank, (eid, (shape, dtype)) in enumerate(zip(self.engines, self.metas)):
            n = shape[self.axis] if shape is not None and len(shape) > self.axis else None
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize if shape else 0
            if isinstance(dtype, TableMeta):
                n, nbytes = dtype.rows, dtype.nbytes
            row = {"engine": eid, "rank": rank, "rows": (lo, lo + n) if n is not None else None,
                   "bytes": nbytes, "lost": live is not None and eid not in live}
            device = pool.info(eid).get("device") if pool is not None else None
            if device:
                row["device"] = device
            rows.append(row)
            lo += n or 0
        counted = all(r["rows"] is not None for r in rows)
        return Placement(rows, title=self._title(), total_rows=lo if counted else None)

    def _title(self) -> str:
        # Not through ``length`` or ``lost``: both read placement().
        shape = self.shape
        what = (f"{shape} {self.dtype}" if shape is not None
                else f"{len(self.metas)} shards of {self.metas[0][1]}" if self.metas else "no shards")
        state = "" if self._finalizer.alive else ", freed"
        plane = self._plane()
        if plane is None or plane.closed:
            state += ", its pool stopped"
        return f"{self.name}: {what}, axis {self.axis}{state}"

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and self._plane() is not None

    @property
    def lost(self) -> list[dict[str, Any]]:
        """The shards that were on engines which have stopped (as :meth:`placement` gives
        them: engine, rank, rows, bytes): gone with their engine, even if a replacement took
        its rank."""
        return [row for row in self.placement() if row["lost"]]

    # -- using it ------------------------------------------------------------------------------
    def gather(self, transport: str | None = None) -> Any:
        """Bring the shards back and join them (like ``--gather``), by default over the transport
        the handle was made with."""
        plane = self._live_plane()
        job = Job(self.name, "gather", (Source("resident", self.key),) * len(self.engines),
                  tuple(self.metas), self.axis)
        return plane.bring_back(self.engines, [job], transport or self.transport)[self.name]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = np.asarray(self.gather())
        return arr.astype(dtype, copy=False) if dtype is not None else arr

    def free(self) -> None:
        """Drop the shards on the engines (done with the next call to them)."""
        self._finalizer()

    def _live_plane(self) -> Any:
        plane = self._plane()
        if not self._finalizer.alive:
            raise PoolError(f"the shards of `{self.name}` were freed; scatter the data again.")
        if plane is None or plane.closed:
            raise PoolError(
                f"the pool that held the shards of `{self.name}` has stopped, and the shards with "
                f"it; scatter the data again on the current pool."
            )
        lost = self.lost
        if lost:
            where = "; ".join(f"rows {r['rows'][0]}-{r['rows'][1] - 1} on engine {r['engine']}"
                              if r["rows"] else f"rank {r['rank']} on engine {r['engine']}"
                              for r in lost)
            raise PoolError(
                f"part of `{self.name}` is lost: {where}, which stopped. The other shards are "
                f"still on their engines, but the whole cannot be joined; scatter the data again "
                f"(or recompute `{self.name}`). `{self.name}.lost` lists what is gone."
            )
        return plane

    def __reduce__(self) -> Any:
        raise TypeError(
            f"the Resident handle `{self.name}` cannot be sent to engines or pickled; list it as "
            f"a scattered name in %%scatter to use its shards, or np.asarray({self.name}) first."
        )

    def __repr__(self) -> str:
        state = "" if self.alive else ", freed"
        lost = self.lost if self.alive else []
        if lost:
            state += f", {len(lost)} shard(s) lost with engine(s) {ranges([r['engine'] for r in lost])}"
        if self.shape is not None:
            what = f"{self.shape} {self.dtype}"
        elif self.is_table:
            what = f"{self.length:,} rows of {self.metas[0][1]} in {len(self.metas)} shards"
        else:
            what = f"{len(self.metas)} shards of {self.metas[0][1]}"
        return (f"<Resident {self.name}: {what}, {nbytes(self.nbytes)} on engines "
                f"{ranges(self.engines)}, axis {self.axis}{state}>")


def _free(plane_ref: Any, engines: list[int], key: str) -> None:
    # Runs from a finalizer, maybe in the middle of another call: only note the work to do.
    plane = plane_ref()
    if plane is not None and not plane.closed:
        for eid in engines:
            plane.free_later(eid, key)

