"""What a comm backend does, and the parts of it every backend shares.

A collective is a few *rounds*. In a round every rank contributes items (one for everyone, or one
per destination), then waits until every rank has contributed, then reads what it needs of the
others' items. A round is also the check that all ranks agree: each contribution carries the
call's description (``allreduce(float64 (1000,), op=sum)``) and number, so ranks that called
different collectives fail together with a message naming both calls, instead of waiting for
ever. ``api.py`` builds every collective from rounds; a backend only moves them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

from ..errors import CommError, CommTimeout
from .spec import CommSpec

__all__ = ["Backend", "Round", "Call", "EVERYONE", "EACH", "LOOK", "mismatch"]

#: Contribution modes: ``items[0]`` for every rank, or ``items[j]`` for rank j.
EVERYONE, EACH = "everyone", "each"
#: Seconds between looks at the other ranks' health while waiting (a failed rank is noticed
#: within this, a dead engine within a second).
LOOK = 0.05


class Call(NamedTuple):
    """One collective as the other ranks see it: its number on this comm, what it is, where.
    (A named tuple: one is made per call, and an 8-byte allreduce takes a few microseconds.)"""

    seq: int
    desc: str
    line: int

    def __str__(self) -> str:
        at = f" at line {self.line}" if self.line > 0 else ""
        return f"{self.desc} (call #{self.seq}{at})"


class Round(ABC):
    """The others' contributions to one round, read on demand."""

    @abstractmethod
    def get(self, source: int, copy: bool = True) -> Any:
        """The item rank ``source`` contributed for this rank (views with ``copy`` False: valid
        until this rank starts its next round)."""


class Backend(ABC):
    """Moves rounds between the ranks of one :class:`~nbparallel.comm.spec.CommSpec`."""

    name: str

    def __init__(self, spec: CommSpec, rank: int):
        self.spec, self.rank, self.size = spec, rank, spec.size
        #: Bytes this rank read from each other rank (the comm matrix's row of this rank).
        self.received = [0] * spec.size

    @abstractmethod
    def round(self, call: Call, mode: str, items: Sequence[Any]) -> Round:
        """Contribute ``items``, wait for every rank's contribution to the same call, check that
        they match, and return the others' contributions."""

    def reserve(self, nbytes: int) -> Any:
        """Writable memory (uint8) where this rank's next round will publish ``nbytes``: an
        array written there and passed as the round's only item is not copied again. None
        where the backend has no such memory (then the round copies as usual)."""
        return None

    @abstractmethod
    def enter(self, call: Call) -> None:
        """Say where this rank is now (for the others' timeout reports)."""

    @abstractmethod
    def look(self, waiting: Sequence[int], call: Call, since: float) -> None:
        """Raise if any of ``waiting`` failed, left or died, or if ``since`` is longer ago than
        the timeout; called every :data:`LOOK` seconds of a wait."""

    @abstractmethod
    def close(self, failure: str | None) -> None:
        """This rank is done with the cell (``failure``: why it failed), so waits end."""

    def timeout(self, call: Call, since: float, waiting: Sequence[int],
                where: dict[int, str]) -> CommTimeout:
        waited = time.monotonic() - since
        ranks = ", ".join(str(r) for r in waiting)
        report = "; ".join(f"rank {r} {where[r]}" for r in waiting if r in where)
        return CommTimeout(
            f"rank {self.rank} waited {waited:.0f} s in {call} for rank(s) {ranks}, which did not "
            f"arrive. {report}. Make every rank call the same collectives in the same order, or "
            f"allow more time with --comm-timeout (or nbparallel.config.comm_timeout)."
        )


def mismatch(calls: dict[int, tuple[int, str, int]]) -> CommError:
    """Ranks that contributed to the same round from different calls (rank -> seq, desc, line)."""
    groups: dict[tuple[int, str], list[int]] = {}
    lines: dict[tuple[int, str], int] = {}
    for rank, (seq, desc, line) in sorted(calls.items()):
        groups.setdefault((seq, desc), []).append(rank)
        lines[seq, desc] = line
    said = "; ".join(
        f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))} called {Call(seq, desc, lines[seq, desc])}"
        for (seq, desc), r in groups.items())
    return CommError(
        f"the ranks called different collectives: {said}. Every rank must make the same comm "
        f"calls in the same order, with arrays of the same dtype and shape; this comm cannot be "
        f"used again in this cell."
    )
