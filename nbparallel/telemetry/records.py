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

__all__ = ["Transfer", "Ring", "KINDS", "TRANSPORTS"]

#: What a transfer carried.
KINDS = ("scatter", "broadcast", "gather", "reduce", "payload", "result", "stage")
#: How it travelled: shared memory, a direct authenticated channel, ipyparallel's controller.
TRANSPORTS = ("shm", "direct", "ipp")

T = TypeVar("T")


@dataclass(frozen=True)
class Transfer:
    """Bytes that moved between the notebook and one engine.

    ``direction`` is ``"out"`` (notebook to engine) or ``"in"`` (engine to notebook). ``nbytes``
    counts the payload as delivered to that engine: a broadcast placed once in shared memory and
    read by three engines is three records.
    """

    engine: int
    kind: str
    direction: str
    transport: str
    nbytes: int
    time: float


class Ring(Generic[T]):
    """A bounded buffer of records; ``cursor`` counts every record ever appended."""

    def __init__(self, maxlen: int = 10_000):
        self._items: deque[T] = deque(maxlen=maxlen)
        self.cursor = 0

    def append(self, item: T) -> None:
        self._items.append(item)
        self.cursor += 1

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def since(self, cursor: int) -> tuple[list[T], int]:
        """Records appended after ``cursor`` that are still held, and the new cursor."""
        held = len(self._items)
        missed = max(0, self.cursor - cursor)
        start = max(0, held - missed)
        return list(self._items)[start:], self.cursor

    def __len__(self) -> int:
        return len(self._items)


def transfer(engine: int, kind: str, direction: str, transport: str, nbytes: int) -> Transfer:
    """A :class:`Transfer` stamped with the current wall-clock time."""
    return Transfer(engine, kind, direction, transport, int(nbytes), time.time())
