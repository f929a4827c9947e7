"""Collectives between engines that are ranks of one MPI world, over the cluster's own MPI.

Engines launched with ``ipcluster start --engines=mpi`` run ``MPI_Init`` and are one world. Their
rounds go through MPI point-to-point messages (mpi4py's ``pkl5`` layer: arrays as out-of-band
buffers, not pickled), which ride whatever interconnect the MPI library was built for. Only
non-blocking calls are used (``isend``, matched probes), polled with the same checks as every
other wait: a rank that failed or left is noticed over the signed channels (as in
``channel.py``), the timeout and Ctrl-C end the wait, and no engine is left inside an MPI call it
cannot leave. Messages carry the cell's comm id and round, so leftovers of an aborted cell are
recognised and dropped.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from ..errors import CommError
from .backend import EVERYONE, LOOK, Call, Round, mismatch
from .channel import ChannelBackend, _ChannelRound
from .spec import MPI_BACKEND, CommSpec

__all__ = ["MpiBackend", "world", "mpi_rank"]

_TAGS = 30_000  # MPI guarantees tags up to 32767
#: Environment variables that name one MPI launch (job), by library: PMIx (Open MPI 4+, Slurm),
#: Open MPI's own, and MPICH's Hydra.
_WORLD_VARS = ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "PMI_KVS_NAME", "PMI_KVSNAME")


def _mpi() -> Any:
    """mpi4py's MPI module when this process already runs MPI, else None. ``ipengine --mpi``
    imports it; nbparallel never starts MPI in a process itself."""
    import sys

    if "mpi4py.MPI" not in sys.modules:
        return None
    from mpi4py import MPI

    return MPI if MPI.Is_initialized() and not MPI.Is_finalized() else None


def world() -> Any:
    """``COMM_WORLD`` through mpi4py's pickle-5 layer, or None when this engine is no MPI rank."""
    MPI = _mpi()
    if MPI is None:
        return None
    from mpi4py.util import pkl5

    return pkl5.Intracomm(MPI.COMM_WORLD)


def mpi_rank() -> dict[str, Any] | None:
    """This engine's ``rank`` and ``size`` in its MPI ``world`` (an id the ranks of one launch
    share), or None when it is no MPI rank."""
    import os

    MPI = _mpi()
    world_id = next((os.environ[v] for v in _WORLD_VARS if os.environ.get(v)), None)
    if MPI is None or world_id is None:
        return None
    return {"rank": MPI.COMM_WORLD.Get_rank(), "size": MPI.COMM_WORLD.Get_size(), "world": world_id}


class MpiBackend(ChannelBackend):
    name = MPI_BACKEND

    def __init__(self, spec: CommSpec, rank: int):
        super().__init__(spec, rank)
        self._world = world()
        if self._world is None or spec.mpi_ranks is None:
            raise CommError(
                f"--comm mpi: engine {spec.engines[rank]} is not an MPI rank (start the cluster "
                f"with `ipcluster start --engines=mpi`), or mpi4py is missing there.")
        self._ranks = spec.mpi_ranks
        self._base = int(spec.id[:8], 16) % _TAGS

    def round(self, call: Call, mode: str, items: Sequence[Any]) -> Round:
        self._count += 1
        count, tag = self._count, 1 + (self._base + self._count) % _TAGS
        sends = []
        for j in range(self.size):
            if j != self.rank:
                item = items[0] if mode == EVERYONE else items[j]
                sends.append(self._world.isend((self.spec.id, count, call.seq, call.desc,
                                                call.line, item), dest=self._ranks[j], tag=tag))
        got: dict[int, Any] = {}
        since = time.monotonic()
        next_look, spins = since + LOOK, 0
        while len(got) < self.size - 1 or not all(r.test()[0] for r in sends):
            progressed = False
            for j in range(self.size):
                if j == self.rank or j in got:
                    continue
                msg = self._world.improbe(source=self._ranks[j], tag=tag)
                if msg is None:
                    continue
                value = msg.recv()
                progressed = True
                if value[0] == self.spec.id and value[1] == count:  # else a stale cell's: dropped
                    got[j] = value[2:]
            spins = 0 if progressed else spins + 1
            if spins > 100:
                time.sleep(0 if spins < 1000 else 2e-4)
                now = time.monotonic()
                if now >= next_look:
                    self.look([j for j in range(self.size) if j != self.rank and j not in got],
                              call, since)
                    next_look = now + LOOK
        calls = {j: tuple(v[:3]) for j, v in got.items()}
        calls[self.rank] = (call.seq, call.desc, call.line)
        if len({(s, d) for s, d, _ in calls.values()}) > 1:
            raise mismatch(calls)
        return _ChannelRound({j: v[3] for j, v in got.items()})
