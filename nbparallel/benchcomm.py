"""The ``comm`` group of ``nbparallel bench``: collectives between two local engines, beside
mpi4py under ``mpiexec -n 2`` on the same machine and ``numpy.copyto`` of the same bytes.

What each row times, per call, on two ranks (best and median of ``repeat`` batches, each the
mean of many calls; every batch starts after a barrier):

* ``allreduce 8 B``: a Python float summed over the ranks: ``comm.allreduce(1.0)`` against
  mpi4py's object ``allreduce`` (row ``mpi4py``) and, for reference, its buffer ``Allreduce`` of
  one float64 (row ``mpi4py buffer``).
* ``allreduce 1 MB`` and ``allreduce 64 MB``: float64 arrays summed into a result buffer,
  ``comm.allreduce(a, out=b)`` against ``Allreduce(a, b)``; row ``nbparallel, new array``
  allocates the result each call (``comm.allreduce(a)``).
* ``halo 32 KiB``: each rank swaps one 32 KiB row with its neighbour, ``comm.halo(u, 1,
  out=ext)`` against ``Sendrecv`` of the same row.
* ``numpy.copyto`` of the same bytes is the memory ceiling (an allreduce reads and writes at
  least that much), reported as a percentage.

Open MPI runs as ``mpiexec`` starts it (its ranks bound to cores); our engines run unpinned.
Without ``mpiexec`` or mpi4py (the ``nbparallel[mpi]`` extra) the MPI rows say so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

import nbparallel

from .benchkit import MB, NB, Setup, Trial, measure

if TYPE_CHECKING:
    from .session import Session

__all__ = ["WHATS", "group", "mpiexec"]

WHATS = ("allreduce 8 B", "allreduce 1 MB", "allreduce 64 MB", "halo 32 KiB")
NBYTES = {"allreduce 8 B": 8, "allreduce 1 MB": MB, "allreduce 64 MB": 64 * MB,
          "halo 32 KiB": 32 << 10}
CALLS = {"allreduce 8 B": 2000, "allreduce 1 MB": 200, "allreduce 64 MB": 10, "halo 32 KiB": 2000}
NEW_ARRAY = "nbparallel, new array"
MPI_TIMEOUT = 300

# The same programme twice, once for our comm in a %%scatter cell, once for mpi4py; {batches}
# is repeat + 1 (the first is the warm-up, which also checks the results).
_SETUP = """
import time, numpy as np
N1, N64, ROW = {mb} // 8, 64 * {mb} // 8, 4096
a1, b1 = np.full(N1, rank + 1.0), np.zeros(N1)
a64, b64 = np.full(N64, rank + 1.0), np.zeros(N64)
ext = np.zeros((9, ROW))
u = ext[:8] if rank == 0 else ext[1:]  # the halo row in place, as a stencil keeps it
u[...] = rank
def batches(fn, calls, check):
    out = []
    for _ in range({batches}):
        barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls)
        if not check():
            raise RuntimeError("the result is wrong: the benchmarked path is broken")
    return out
other = 1 - rank
want = 3.0
"""
COMM_CELL = _SETUP + """
barrier = comm.barrier
got = {{}}
got["allreduce 8 B"] = batches(lambda: comm.allreduce(1.0), {c8}, lambda: comm.allreduce(1.0) == 2.0)
got["allreduce 1 MB"] = batches(lambda: comm.allreduce(a1, out=b1), {c1}, lambda: (b1 == want).all())
got["allreduce 64 MB"] = batches(lambda: comm.allreduce(a64, out=b64), {c64}, lambda: (b64 == want).all())
got["halo 32 KiB"] = batches(lambda: comm.halo(u, 1, out=ext), {ch},
                             lambda: (ext[8 * other] == float(other)).all())
got["new 1 MB"] = batches(lambda: comm.allreduce(a1), {c1}, lambda: True)
got["new 64 MB"] = batches(lambda: comm.allreduce(a64), {c64}, lambda: True)
"""
MPI_SCRIPT = """
import json, sys
from mpi4py import MPI
w = MPI.COMM_WORLD
rank = w.rank
""" + _SETUP + """
barrier = w.Barrier
one, res = np.ones(1), np.zeros(1)
recv = np.zeros(ROW)
def halo():
    w.Sendrecv(u[-1] if rank == 0 else u[0], dest=other, recvbuf=recv, source=other)
got = {{}}
got["allreduce 8 B"] = batches(lambda: w.allreduce(1.0), {c8}, lambda: w.allreduce(1.0) == 2.0)
got["buffer 8 B"] = batches(lambda: w.Allreduce(one, res), {c8}, lambda: res[0] == 2.0)
got["allreduce 1 MB"] = batches(lambda: w.Allreduce(a1, b1), {c1}, lambda: (b1 == want).all())
got["allreduce 64 MB"] = batches(lambda: w.Allreduce(a64, b64), {c64}, lambda: (b64 == want).all())
got["halo 32 KiB"] = batches(halo, {ch}, lambda: (recv == float(other)).all())
if rank == 0:
    version = MPI.Get_library_version().splitlines()[0].split(",")[0].strip()
    json.dump({{"got": got, "version": version}}, sys.stdout)
"""


def _fill(text: str, repeat: int) -> str:
    return text.format(mb=MB, batches=repeat + 1, c8=CALLS["allreduce 8 B"],
                       c1=CALLS["allreduce 1 MB"], c64=CALLS["allreduce 64 MB"],
                       ch=CALLS["halo 32 KiB"])


def _replay(got: dict[str, list[float]], names: dict[str, str]) -> Setup:
    """A setup whose trials hand out the batches already measured, one per trial."""
    @contextmanager
    def setup() -> Iterator[Trial]:
        count = iter(range(10**9))

        def trial(_check: bool) -> dict[str, float]:
            i = next(count)
            return {what: got[key][i] for what, key in names.items()}
        yield trial
    return setup


def group(pool: Session, repeat: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    def case(name: str, whats: list[str], setup: Setup | None, why: str | None = None) -> list[dict[str, Any]]:
        rows = measure("comm", name, whats, setup, repeat, say, nbytes=NBYTES)
        if why:
            for row in rows:
                row["error"] = why
        return rows

    if len(pool.ids) < 2:
        return case(NB, list(WHATS), None, "needs 2 engines")
    say("bench: comm: nbparallel: one cell on engines 0-1")
    try:
        out = nbparallel.scatter(_fill(COMM_CELL, repeat), {}, reduce={"got": "list"},
                                 engines=pool.ids[:2], pool=pool, dashboard=False)["got"]
        mine = {k: [max(a, b) for a, b in zip(out[0][k], out[1][k])] for k in out[0]}
        error = None
    except nbparallel.NbparallelError as exc:
        mine, error = {}, f"error: {str(exc).splitlines()[0]}"
    rows = case(NB, list(WHATS), _replay(mine, {w: w for w in WHATS}) if mine else None, error)
    rows += case(NEW_ARRAY, ["allreduce 1 MB", "allreduce 64 MB"],
                 _replay(mine, {"allreduce 1 MB": "new 1 MB", "allreduce 64 MB": "new 64 MB"})
                 if mine else None, error)
    theirs, version, why = _mpi(repeat, say)
    name = f"mpi4py ({version})" if version else "mpi4py"
    rows += case(name, list(WHATS), _replay(theirs, {w: w for w in WHATS}) if theirs else None, why)
    rows += case("mpi4py buffer", ["allreduce 8 B"],
                 _replay(theirs, {"allreduce 8 B": "buffer 8 B"}) if theirs else None, why)
    rows += case("numpy.copyto", ["allreduce 1 MB", "allreduce 64 MB", "halo 32 KiB"], _copies)
    return rows


@contextmanager
def _copies() -> Iterator[Trial]:
    bufs = {w: (np.ones(NBYTES[w] // 8), np.zeros(NBYTES[w] // 8)) for w in WHATS[1:]}

    def trial(_check: bool) -> dict[str, float]:
        out = {}
        for what, (src, dst) in bufs.items():
            calls = CALLS[what]
            t0 = time.perf_counter()
            for _ in range(calls):
                np.copyto(dst, src)
            out[what] = (time.perf_counter() - t0) / calls
        return out
    yield trial


def mpiexec() -> list[str] | None:
    """The command that starts two MPI ranks on this machine, or None without Open MPI/MPICH."""
    exe = shutil.which("mpiexec")
    if exe is None:
        return None
    text = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    cmd = [exe, "-n", "2"]
    if "Open MPI" in text or "OpenRTE" in text:
        cmd.append("--oversubscribe")
    return cmd


def _mpi(repeat: int, say: Callable[[str], None]) -> tuple[dict[str, list[float]], str | None, str | None]:
    cmd = mpiexec()
    if cmd is None:
        return {}, None, "not installed (no mpiexec: Debian's openmpi-bin)"
    try:
        import mpi4py  # noqa: F401  (only whether it is there: the ranks import it)
    except ImportError:
        return {}, None, "not installed (pip install 'nbparallel[mpi]')"
    say("bench: comm: mpi4py under mpiexec -n 2")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_fill(MPI_SCRIPT, repeat))
    try:
        done = subprocess.run([*cmd, sys.executable, f.name], capture_output=True, text=True,
                              timeout=MPI_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return {}, None, f"error: mpiexec did not finish within {MPI_TIMEOUT} s"
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {}, None, f"error: mpiexec exited with {done.returncode}: {last}"
    report = json.loads(done.stdout)
    return report["got"], report["version"], None
