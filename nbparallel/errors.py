"""The exceptions nbparallel raises, one tree so a notebook can catch them all.

::

    NbparallelError
    ├── UsageError            bad input caught in the notebook, before anything is sent
    │   └── PartitionError    a value that cannot be split, joined or reduced as asked
    ├── PoolError             no cluster reachable, unknown or missing engines
    │   └── ControllerLost    the cluster's controller stopped; the pool cannot be used again
    ├── TransferError         bytes could not move: a data-plane transfer refused, timed out, or
    │                         its engine gone (``ChannelError`` of the direct channels is one)
    ├── RemoteError           user code raised inside an engine
    │   └── PmapError         some %%pmap items failed; the rest of the results are kept
    └── CommError             raised inside a cell by ``comm``: a collective that cannot complete
        ├── CommTimeout       a rank waited longer than the comm timeout for the others
        └── PeerFailed        another rank of the collective failed, left the cell, or died

Every message is one paragraph that says what was wrong and how to fix it. When any of these is
raised by a magic, no notebook variable has been changed. The ``CommError`` family is raised on
the engines, inside the cell; the notebook receives it as a :class:`RemoteError` whose failures
name it (the rank that failed first is shown first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "NbparallelError",
    "UsageError",
    "PartitionError",
    "PoolError",
    "ControllerLost",
    "TransferError",
    "RemoteError",
    "RemoteFailure",
    "PmapError",
    "CommError",
    "CommTimeout",
    "PeerFailed",
]


class NbparallelError(Exception):
    """Base class of every error nbparallel raises on purpose."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing our own frames: the message is the whole story
        # (for remote errors it already holds the user's traceback from the engine).
        return f"{type(self).__name__}: {self}".splitlines()


class UsageError(NbparallelError, ValueError):
    """The magic or API call was given something it cannot use; nothing was sent to engines."""


class PartitionError(UsageError):
    """A value cannot be split across engines, or results cannot be joined or reduced."""


class PoolError(NbparallelError, RuntimeError):
    """No usable engine pool: nothing to connect to, or engines that do not exist or died."""


class ControllerLost(PoolError):
    """The controller of the pool's cluster stopped answering: no work reaches the engines and no
    result comes back. The message says how to get a working pool again (``%nbp restart`` for a
    pool nbparallel started, ``ipcluster start`` then ``%nbp connect`` for one it connected to)."""


class TransferError(NbparallelError, RuntimeError):
    """Bytes could not move between the notebook and an engine, or between engines: a transfer
    refused (a wrong key, a tampered answer), not answered in time, or whose engine stopped.
    The message names the engine or endpoint and what was being moved."""


@dataclass(frozen=True)
class RemoteFailure:
    """One exception raised by user code on one engine.

    ``traceback`` holds only the frames of the user's own code (the cell and what it called),
    never nbparallel's runner frames.

    >>> RemoteFailure(3, "ValueError", "bad batch", "", stage="l2", microbatch=5, op="F").where()
    'engine 3, stage l2, micro-batch 5, forward'
    >>> RemoteFailure(0, "KeyError", "'x'", "", item=7).where()
    'engine 0, item 7'
    """

    engine: int
    ename: str
    evalue: str
    traceback: str
    rank: int | None = None
    item: int | None = None
    stage: str | None = None
    microbatch: int | None = None
    op: str | None = None

    def where(self) -> str:
        parts = [f"engine {self.engine}"]
        if self.stage is not None:
            parts.append(f"stage {self.stage}")
        if self.microbatch is not None:
            parts.append(f"micro-batch {self.microbatch}")
        if self.op is not None:
            parts.append({"F": "forward", "B": "backward", "I": "backward_input",
                          "W": "backward_weight"}.get(self.op, self.op))
        if self.rank is not None and self.stage is None:
            parts.append(f"rank {self.rank}")
        if self.item is not None:
            parts.append(f"item {self.item}")
        return ", ".join(parts)


class RemoteError(NbparallelError):
    """User code raised on one or more engines.

    ``failures`` lists every failure; the message shows the first one's traceback, which points at
    the user's own line, and names the engine (and rank or item) it ran on.
    """

    def __init__(self, what: str, failures: list[RemoteFailure]):
        self.failures = list(failures)
        first = self.failures[0]
        others = ""
        if len(self.failures) > 1:
            where = "; ".join(f.where() for f in self.failures[1:6])
            more = "" if len(self.failures) <= 6 else f" and {len(self.failures) - 6} more"
            others = f"\n\nAlso failed: {where}{more}."
        super().__init__(
            f"{what} failed on {first.where()}: {first.ename}: {first.evalue}\n\n"
            f"{first.traceback.rstrip()}{others}"
        )

    @property
    def engine(self) -> int:
        return self.failures[0].engine


class PmapError(RemoteError):
    """Some items of a parallel map failed.

    ``results`` is the full result list in input order, with ``None`` where an item failed;
    ``failed`` maps each failed item's index to its :class:`RemoteFailure`. Nothing that succeeded
    is lost::

        try:
            %pmap ...
        except PmapError as e:
            good = [r for i, r in enumerate(e.results) if i not in e.failed]
    """

    def __init__(self, failures: list[RemoteFailure], results: list[Any], total: int):
        self.failures = sorted(failures, key=lambda f: f.item if f.item is not None else -1)
        self.results = results
        self.failed = {f.item: f for f in self.failures}
        indices = sorted(self.failed)
        shown = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
        first = self.failures[0]
        NbparallelError.__init__(
            self,
            f"%%pmap: {len(indices)} of {total} items failed (indices {shown}). The other results "
            f"are kept in this error's .results (None where an item failed). First failure, on "
            f"{first.where()}: {first.ename}: {first.evalue}\n\n{first.traceback.rstrip()}",
        )


class CommError(NbparallelError):
    """A ``comm`` call inside a cell could not complete: bad arguments, ranks that called
    different collectives (or the same one with other shapes), or one of the subclasses below.
    Raised on every rank that takes part, so none is left waiting."""


class CommTimeout(CommError):
    """A rank waited longer than the comm timeout (``--comm-timeout``, ``nbparallel.config``)
    for the others; the message says which ranks had not arrived and where each one was."""


class PeerFailed(CommError):
    """Another rank of this collective raised, finished its cell without joining, or died; this
    rank stopped waiting for it."""
