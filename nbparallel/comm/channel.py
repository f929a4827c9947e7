"""Collectives between engines that share no memory: rounds over the signed direct channels.

Every rank sends its contribution to every other rank (an empty one where it has nothing for
it), so a round is also a barrier and a match of the calls, as in shared memory. It is the
fallback, for engines of other hosts when they are not one MPI world; a round costs one signed
message per pair of ranks.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..dataplane import remote, transport
from ..dataplane.transport import DIRECT
from ..errors import PeerFailed
from .backend import EVERYONE, LOOK, Backend, Call, Round, mismatch
from .spec import CommSpec

__all__ = ["ChannelBackend", "take", "post"]


def post(spec: CommSpec, dest: int, tid: str, value: Any, same_host: bool) -> int:
    """Send ``value`` to rank ``dest`` under ``tid``; returns the bytes moved."""
    return remote.send(spec.endpoints[dest], tid, value, spec.owner if same_host else None)[0]


def take(backend: Backend, tid: str, call: Call, waiting: Sequence[int], since: float) -> Any:
    """The message ``tid``, looking at the ranks in ``waiting`` while it has not come."""
    server = remote.server()
    while not server.arrived(tid, LOOK):
        backend.look(waiting, call, since)
    return remote.receive(tid, timeout=LOOK)


class ChannelBackend(Backend):
    name = DIRECT

    def __init__(self, spec: CommSpec, rank: int):
        super().__init__(spec, rank)
        self._count = 0
        self._status: dict[int, tuple[str, Any]] = {}
        self._current: Call | None = None

    def _tid(self, kind: str, count: int | str, src: int, dst: int) -> str:
        return f"{self.spec.id}:{kind}:{count}:{src}>{dst}"

    def enter(self, call: Call) -> None:
        self._current = call

    def round(self, call: Call, mode: str, items: Sequence[Any]) -> Round:
        self._count += 1
        count = self._count
        for j in range(self.size):
            if j != self.rank:
                item = items[0] if mode == EVERYONE else items[j]
                post(self.spec, j, self._tid("r", count, self.rank, j),
                     (call.seq, call.desc, call.line, item), False)
        since = time.monotonic()
        got: dict[int, Any] = {}
        for j in range(self.size):
            if j != self.rank:
                got[j] = take(self, self._tid("r", count, j, self.rank), call, [j], since)
                self.received[j] += transport.nbytes_of(got[j][3])
        calls = {j: tuple(v[:3]) for j, v in got.items()}
        calls[self.rank] = (call.seq, call.desc, call.line)
        if len({(s, d) for s, d, _ in calls.values()}) > 1:  # lines may differ
            raise mismatch(calls)
        return _ChannelRound({j: v[3] for j, v in got.items()})

    def look(self, waiting: Sequence[int], call: Call, since: float) -> None:
        server = remote.server()
        for r in waiting:
            tid = self._tid("x", "end", r, self.rank)
            if r not in self._status and server.arrived(tid):
                self._status[r] = remote.receive(tid, timeout=LOOK)
            how, what = self._status.get(r, (None, None))
            if how == "failed":
                raise PeerFailed(f"rank {r} failed while rank {self.rank} waited in {call}: {what}")
            if how == "left":
                raise PeerFailed(
                    f"rank {r} finished the cell without calling {call}: every rank must make "
                    f"the same comm calls (check conditions that depend on rank or on the data).")
        if time.monotonic() - since > self.spec.timeout:
            where = {r: "has not sent its part (it is on another host: its position is not "
                        "known here)" for r in waiting}
            raise self.timeout(call, since, waiting, where)

    def close(self, failure: str | None) -> None:
        status = ("failed", failure) if failure is not None else ("left", self._count)
        for j in range(self.size):
            if j != self.rank:
                try:
                    post(self.spec, j, self._tid("x", "end", self.rank, j), status, False)
                except Exception:
                    pass  # best effort: a rank that cannot be told still times out


class _ChannelRound(Round):
    def __init__(self, values: dict[int, Any]):
        self.values = values

    def get(self, source: int, copy: bool = True) -> Any:
        value = self.values[source]
        return _copy(value) if copy else value


def _copy(value: Any) -> Any:
    # Received arrays may be read-only views of message frames; the caller owns its result.
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value
