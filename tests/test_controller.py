"""The cluster's controller is killed: between cells, in the middle of one, under a connected pool.

ipyparallel queues requests to a controller that has gone and never answers them, so without a
check a cell would wait forever. Each test kills a real controller process with SIGKILL and
expects a ControllerLost error within seconds, the notebook's names untouched, and a way back
that works: `%nbp restart` for a pool nbparallel started, a new cluster and `%nbp connect` for
one it connected to. Nothing of the old cluster may be left running.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import nbparallel
from nbparallel import session as pool_mod
from nbparallel.errors import ControllerLost

pytestmark = pytest.mark.cluster

A = np.arange(12.0)


def untouched(ip, before: dict) -> None:
    assert set(ip.user_ns) == set(before)
    for name, value in before.items():
        assert ip.user_ns[name] is value, name


def gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Those of ``pids`` still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _running(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone, possibly reaped between a look and the next
        return False


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def own(monkeypatch):
    """A started pool of 2 engines of its own, current for the magics while the test runs."""
    pool = nbparallel.Session(nbparallel.Pool.start(2))
    monkeypatch.setattr(pool_mod, "_current", pool)
    owner = pool.plane.arena.owner
    yield pool
    pool_mod.stop()
    pool.stop()
    assert list(Path("/dev/shm").glob(f"nbp-{owner}-*")) == []


def test_a_killed_controller_is_reported_by_the_next_magic_and_restart_brings_the_pool_back(
        ip, own, capsys):
    family = own.pool._controller_pids + [own.info(e)["pid"] for e in own.ids]
    assert len(own.pool._controller_pids) > 1  # the controller and its scheduler processes
    os.kill(own.pool._controller_pids[0], signal.SIGKILL)  # the controller alone, as an OOM kill would
    # SIGKILL is delivered asynchronously: "the next magic" is the one after it has died (a magic
    # that starts while the controller still runs may legitimately complete through its schedulers).
    assert gone(own.pool._controller_pids[:1]) == []
    ip.user_ns.update(a=A, b="before", r="before")
    before = dict(ip.user_ns)
    for magic, line, cell in [("scatter", "a --gather b --no-dashboard", "b = a * 2"),
                              ("pmap", "x in range(4) -> r --no-dashboard", "x + 1")]:
        t0 = time.perf_counter()
        with pytest.raises(ControllerLost, match=r"its process \(pid \d+\) has exited") as info:
            ip.run_cell_magic(magic, line, cell)
        assert time.perf_counter() - t0 < 3
        assert "%nbp restart" in str(info.value) and "variables are as they were" in str(info.value)
        untouched(ip, before)
    with pytest.raises(ControllerLost):
        ip.run_line_magic("nbp", "status")  # would wait forever on queue_status otherwise

    ip.run_line_magic("nbp", "restart")
    fresh = pool_mod.current()
    assert fresh is not own and len(fresh.ids) == 2
    ip.run_cell_magic("scatter", "a --gather b --no-dashboard", "b = a * 2")
    np.testing.assert_array_equal(ip.user_ns["b"], A * 2)
    # The schedulers of the killed controller and the old engines are gone too.
    assert gone(family) == []


@pytest.mark.parametrize("magic, line, cell", [
    ("scatter", "a --gather b --no-dashboard", "import time\ntime.sleep(60)\nb = a"),
    ("pmap", "x in range(40) -> r --no-dashboard", "import time\ntime.sleep(0.5)\nx"),
])
def test_a_controller_lost_in_the_middle_of_a_cell_ends_the_wait(ip, own, magic, line, cell):
    family = list(own.pool._controller_pids)
    ip.user_ns.update(a=A, b="before", r="before")
    before = dict(ip.user_ns)
    timer = threading.Timer(1.5, kill_all, (family,))  # the whole controller: no reply can come
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(ControllerLost):
        ip.run_cell_magic(magic, line, cell)
    timer.join()
    assert time.perf_counter() - t0 < 1.5 + 3
    untouched(ip, before)
    assert own.plane.arena.leased() == []
    engines = [own.info(e)["pid"] for e in own.ids]
    t0 = time.perf_counter()
    own.stop()  # the engines are still busy with the cell; ipyparallel alone waits 10 s for them
    assert time.perf_counter() - t0 < 5
    assert gone(engines) == []


def test_a_connected_pool_notices_its_controller_has_gone(ip, monkeypatch, tmp_path):
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=1, cluster_id="nbp-lost", log_level=40)
    cluster.start_cluster_sync()
    try:
        cluster.connect_client_sync().wait_for_engines(1, timeout=120, interactive=False)
        pool = nbparallel.Session(nbparallel.Pool.connect(cluster_id="nbp-lost", timeout=30))
        monkeypatch.setattr(pool_mod, "_current", pool)
        ip.user_ns.update(a=A)
        ip.run_cell_magic("scatter", "a --gather b --no-dashboard", "b = a + 1")
        np.testing.assert_array_equal(ip.user_ns["b"], A + 1)
        # A connected pool has no pid to watch: it probes the controller's port instead.
        assert pool.pool._controller.pids == []
        controller = cluster.controller.pid
        kill_all([controller, *(p.pid for p in psutil.Process(controller).children(True))])
        gone([controller])
        before = dict(ip.user_ns)
        t0 = time.perf_counter()
        with pytest.raises(ControllerLost, match=r"nothing listens at tcp://127\.0\.0\.1:\d+") \
                as info:
            ip.run_cell_magic("scatter", "a --gather b --no-dashboard", "b = a + 2")
        assert time.perf_counter() - t0 < 3
        assert ("(`ipcluster start -n 1 --cluster-id=nbp-lost`), then run "
                "`%nbp connect --cluster-id=nbp-lost`") in str(info.value)
        untouched(ip, before)
        pool.stop()
    finally:
        cluster.stop_cluster_sync()
