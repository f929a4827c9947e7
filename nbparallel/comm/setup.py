"""The notebook's half of ``comm``: choose the backend for a cell's engines and make its spec.

Engines that all map this notebook's /dev/shm talk through shared memory; engines of other hosts
that are ranks of one MPI world (``ipcluster start --engines=mpi``) through that MPI; any others
through their direct channels. ``--comm shm|mpi|direct`` forces one. The control segment lives for the cell only: the
notebook unlinks it, and any segment an engine made for this comm, when the cell ends, however
it ends.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Sequence

from .. import config
from ..dataplane.shm import Segment
from ..dataplane.transport import DIRECT, SHM
from ..errors import UsageError
from ..reaper import remove_segments
from .shm import slot_owner
from .spec import BLOCK, MPI_BACKEND, CommSpec

__all__ = ["Opened", "open_comm", "check_timeout", "check_backend", "BACKENDS"]

#: What ``--comm`` takes.
BACKENDS = ("auto", SHM, MPI_BACKEND, DIRECT)


@dataclass
class Opened:
    """A cell's comm as the notebook holds it while the cell runs; :meth:`close` after."""

    spec: CommSpec
    control: Segment | None

    def close(self) -> None:
        if self.control is not None:
            self.control.unlink()
            self.control.close()
        if self.spec.backend == SHM:
            remove_segments(slot_owner(self.spec))  # what a killed or stopped engine left


def check_timeout(seconds: Any) -> float:
    value = config.comm_timeout if seconds is None else seconds
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value < 1e7:
        raise UsageError(f"the comm timeout must be a number of seconds above 0, not "
                         f"{seconds!r} (e.g. --comm-timeout 120).")
    return value


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UsageError(f"--comm {name}: unknown comm backend; use one of {', '.join(BACKENDS)} "
                         f"(auto: shared memory between engines of this host, else MPI between "
                         f"the ranks of one MPI world, else direct).")
    return name


def open_comm(plane: Any, ids: Sequence[int], forced: str, timeout: float | None) -> Opened:
    """Choose how the engines ``ids`` talk and make the spec every rank opens its comm on."""
    seconds = check_timeout(timeout)
    local = plane.arena.ok and all(plane.is_local(e) for e in ids)
    check_backend(forced)
    if forced == SHM and not local:
        raise UsageError(
            "--comm shm: these engines do not all share this machine's /dev/shm, so "
            "their comm cannot use shared memory. Use --comm direct, or the default (auto).")
    worlds = [plane.pool.info(e).get("mpi") for e in ids]
    one_world = all(w is not None for w in worlds) and len({w["world"] for w in worlds}) == 1
    if forced == MPI_BACKEND and not one_world:
        raise UsageError(
            "--comm mpi: these engines are not ranks of one MPI world (start them with "
            "`ipcluster start --engines=mpi`, where mpi4py is installed). Use the default (auto).")
    if forced != "auto":
        backend = forced
    else:
        backend = SHM if local else MPI_BACKEND if one_world else DIRECT
    endpoints = tuple(plane.endpoint(e, cluster=not local) for e in ids)
    cid = secrets.token_hex(8)
    # Named like the engines' segments of this comm, so one sweep by the comm's name finds all.
    control = (Segment.create(len(ids) * BLOCK, f"{plane.arena.owner}-{cid}")
               if backend == SHM else None)
    ranks = tuple(w["rank"] for w in worlds) if one_world else None
    spec = CommSpec(cid, tuple(ids), backend, endpoints, plane.arena.owner, seconds,
                    control.name if control else None, ranks)
    return Opened(spec, control)
