"""What the notebook tells each engine about the communicator of one cell.

Frozen and plain, since it crosses the process boundary inside the cell's call. The notebook
builds it (``setup.py``); the engine opens a :class:`~nbparallel.comm.Comm` on it (``api.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CommSpec", "CommStats", "BLOCK", "MPI_BACKEND"]

#: The comm backend of engines that are one MPI world (the others are the transports of the
#: same names: shared memory and the direct channels).
MPI_BACKEND = "mpi"

#: Bytes of the control segment per rank (``shm.py`` lays them out).
BLOCK = 8192


@dataclass(frozen=True)
class CommSpec:
    """One cell's communicator.

    ``id`` is unique to the cell run and prefixes every message; ``engines`` are the engine ids
    in rank order; ``backend`` is the transport name of the collectives (shared memory or the
    direct channels); ``control`` names the shared-memory control segment the notebook made
    (``None`` off one host); ``endpoints`` are each rank's direct channel (point-to-point sends,
    and the collectives between hosts); ``owner`` is what segments the engines make are named
    after, so the notebook's clean-up finds them; ``timeout`` bounds every wait; ``mpi_ranks``
    are the engines' ranks in their MPI world, when they are one.
    """

    id: str
    engines: tuple[int, ...]
    backend: str
    endpoints: tuple[str, ...]
    owner: str | None
    timeout: float
    control: str | None = None
    mpi_ranks: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return len(self.engines)


@dataclass(frozen=True)
class CommStats:
    """What one rank's comm did in a cell: its ``backend``, one span ``(call, start, end)`` per
    call (the first few thousand), how many ``calls`` in all, and the bytes it ``received``
    from each rank (the row of the comm matrix for this rank)."""

    backend: str
    spans: tuple[tuple[str, float, float], ...]
    calls: int
    received: tuple[int, ...]
