"""Telemetry records as plain data, kept in a bounded ring with a monotonic cursor.

Pure: no ipyparallel, no widgets. The data plane appends a :class:`Transfer` for every payload it
moves; readers (the dashboard, ``nbparallel bench``, tests) keep a cursor and ask only for what is
new, as dask's task stream does::

    ring = pool.transfers
    cursor = ring.cursor
    ...                                     # run a cell
    new, cursor = ring.since(cursor)
    sum(t.nbytes for t in new if t.kind == "scatter")
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

__all__ = ["Transfer", "Span", "Sample", "Ring", "transfer", "KINDS", "SPAN_KINDS"]

#: What a transfer carried.
KINDS = ("scatter", "broadcast", "gather", "reduce", "payload", "result", "stage", "comm")
# How it travelled is the name of the transport that carried it (``dataplane.transport.NAMES``);
# telemetry stays below the data plane and takes it as plain text.

#: What a span timed: a %%scatter cell on one shard, a %%pmap chunk, or a pipeline op
#: (F forward, B backward, I backward-input, W backward-weight, step the optimiser step), or a
#: ``comm`` collective inside a cell.
SPAN_KINDS = ("scatter", "pmap", "F", "B", "I", "W", "step", "comm")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Transfer:
    """Bytes that moved between the notebook and one engine.

    ``direction`` is ``"out"`` (notebook to engine) or ``"in"`` (engine to notebook). ``nbytes``
    counts the payload as delivered to that engine: a broadcast placed once in shared memory and
    read by three engines is three records. Kinds ``"stage"`` and ``"comm"`` are engine to
    engine: ``engine`` sent the bytes and ``peer`` received them (-1 for every other kind).
    """

    engine: int
    kind: str
    direction: str
    transport: str
    nbytes: int
    time: float
    peer: int = -1


@dataclass(frozen=True, slots=True)
class Span:
    """Work one engine did, timed on the notebook's clock (engine clock minus its offset).

    ``run`` groups the spans of one magic run (a pipeline run, a %%pmap); ``stage`` and
    ``microbatch`` are -1 outside a pipeline; ``items`` counts the %%pmap items in a chunk.
    """

    engine: int
    kind: str
    start: float
    end: float
    run: str = ""
    stage: int = -1
    microbatch: int = -1
    items: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    """One engine's load at ``time``: CPU % of its process, tasks queued, GPU use where present."""

    engine: int
    time: float
    cpu: float
    queued: int = 0
    gpu_util: float | None = None
    gpu_mem: int | None = None
    gpu_mem_total: int | None = None


class Ring(Generic[_T]):
    """A bounded buffer of records; ``cursor`` counts every record ever appended.

    >>> ring = Ring(maxlen=2)
    >>> ring.extend("abc")
    >>> ring.since(0)  # "a" fell out; the cursor counts all three
    (['b', 'c'], 3)
    >>> ring.append("d")
    >>> ring.since(3)  # only what is new since the last look
    (['d'], 4)
    """

    def __init__(self, maxlen: int = 10_000):
        self._items: deque[_T] = deque(maxlen=maxlen)
        self.cursor = 0

    def append(self, item: _T) -> None:
        self._items.append(item)
        self.cursor += 1

    def extend(self, items: Iterable[_T]) -> None:
        for item in items:
            self.append(item)

    def since(self, cursor: int) -> tuple[list[_T], int]:
        """Records appended after ``cursor`` that are still held, and the new cursor."""
        held = len(self._items)
        missed = max(0, self.cursor - cursor)
        start = max(0, held - missed)
        return list(self._items)[start:], self.cursor

    def __len__(self) -> int:
        return len(self._items)


def transfer(engine: int, kind: str, direction: str, transport: str, nbytes: int,
             peer: int = -1) -> Transfer:
    """A :class:`Transfer` stamped with the current wall-clock time."""
    return Transfer(engine, kind, direction, transport, int(nbytes), time.time(), peer)
