"""Engines started by `ipcluster start --engines=mpi` (Debian's Open MPI, mpi4py): they are ranks
of one MPI world, and `comm` can run its collectives over that MPI (`--comm mpi`; between hosts
that is the default). Skipped without mpiexec or mpi4py, except under CI=true, where .ci/run
installs both and a skip would hide a broken launcher."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import nbparallel
from nbparallel import session as pool_mod
from nbparallel.errors import RemoteError

pytestmark = pytest.mark.cluster

#: Open MPI refuses root and more ranks than cores unless told; the README's recipe says the same.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


@pytest.fixture(scope="module")
def mpi_pool():
    import ipyparallel as ipp

    if not shutil.which("mpiexec") or importlib.util.find_spec("mpi4py") is None:
        if os.environ.get("CI") == "true":
            pytest.fail(".ci/run installs Open MPI and mpi4py: the MPI launcher must be tested")
        pytest.skip("needs mpiexec (Debian's openmpi-bin) and mpi4py (nbparallel[mpi])")
    cid = f"nbpmpi{os.getpid()}"
    ipcluster = [str(Path(sys.executable).with_name("ipcluster"))]
    env = dict(os.environ, **MPI_ENV)
    subprocess.run([*ipcluster, "start", "-n", "2", "--engines=mpi", f"--cluster-id={cid}",
                    "--daemonize"], check=True, timeout=120, env=env)
    pool = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = ipp.Client(cluster_id=cid, timeout=5)
                client.wait_for_engines(2, timeout=60, interactive=False)
                client.close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        pool = nbparallel.Session(nbparallel.Pool.connect(cluster_id=cid, timeout=30, gpus="none"))
        yield pool
    finally:
        if pool is not None:
            pool.stop()
        subprocess.run([*ipcluster, "stop", f"--cluster-id={cid}"], timeout=120, env=env)


@pytest.fixture
def mpi(mpi_pool, monkeypatch):
    monkeypatch.setattr(pool_mod, "_current", mpi_pool)
    return mpi_pool


def test_the_engines_are_ranks_of_one_mpi_world(mpi):
    worlds = {e: mpi.pool.info(e)["mpi"] for e in mpi.ids}
    assert sorted(w["rank"] for w in worlds.values()) == [0, 1]
    assert {w["size"] for w in worlds.values()} == {2}
    assert len({w["world"] for w in worlds.values()}) == 1


CELL = """
import numpy as np
big = np.arange(300_000, dtype=np.float64) * (rank + 1)
out = dict(
    backend=repr(comm),
    number=comm.allreduce(rank + 1),
    big=comm.allreduce(big)[::100_000].tolist(),
    bcast=comm.bcast({"from": rank} if rank == 1 else None, root=1),
    alltoall=comm.alltoall([(rank, j) for j in range(size)]),
    gather=comm.gather(rank, root=0),
    halo=comm.halo(np.full((2, 2), float(rank)), 1).tolist(),
)
comm.send(np.full(3, rank), dest=1 - rank)
out["recv"] = comm.recv(source=1 - rank).tolist()
"""


def test_collectives_over_mpi_agree_with_numpy(mpi):
    outs = nbparallel.scatter(CELL, {}, reduce={"out": "list"}, comm="mpi", pool=mpi)["out"]
    want_big = (np.arange(300_000, dtype=np.float64) * 3)[::100_000].tolist()
    for r, o in enumerate(outs):
        assert "(mpi)" in o["backend"]
        assert o["number"] == 3 and o["big"] == want_big
        assert o["bcast"] == {"from": 1}
        assert o["alltoall"] == [(0, r), (1, r)]
        assert o["gather"] == ([0, 1] if r == 0 else None)
        assert o["recv"] == [1 - r] * 3
    assert outs[0]["halo"] == [[0.0, 0.0]] * 2 + [[1.0, 1.0]]
    assert outs[1]["halo"] == [[0.0, 0.0]] + [[1.0, 1.0]] * 2


def test_local_mpi_ranks_still_talk_through_shared_memory_by_default(mpi):
    got = nbparallel.scatter("b = repr(comm)", {}, reduce={"b": "list"}, pool=mpi)["b"]
    assert all("(shm)" in b for b in got)


def test_an_mpi_wait_is_bounded_and_leaves_the_ranks_usable(mpi):
    t0 = time.perf_counter()
    with pytest.raises(RemoteError) as info:
        nbparallel.scatter("import time\nif rank == 1:\n    time.sleep(3)\ncomm.barrier()", {},
                           comm="mpi", comm_timeout=1, pool=mpi)
    assert time.perf_counter() - t0 < 8
    assert any(f.ename == "CommTimeout" and f.rank == 0 for f in info.value.failures)
    # The next cell's rounds are not confused by what the aborted one left in flight.
    for _ in range(3):
        got = nbparallel.scatter("s = comm.allreduce(rank + 10)", {}, reduce={"s": "list"},
                                 comm="mpi", pool=mpi)["s"]
        assert got == [21, 21]


def test_nbp_status_shows_each_engines_mpi_rank(mpi):
    from nbparallel.magics import _status_table

    table = _status_table(mpi.pool)
    header, _, *rows = table.splitlines()[1:]
    assert header.split()[-2:] == ["MPI", "rank"]
    assert sorted(r.split()[-1] for r in rows) == ["0", "1"]
