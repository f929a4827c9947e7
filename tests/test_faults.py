"""An engine killed with SIGKILL in the middle of every kind of magic.

Each test starts a pool of its own (the session pool's engines must survive) and makes it the
current one, so the magics run on it; then it kills one engine from outside, as the OOM killer
would, while the magic runs. Each time: the error names the dead engine, no notebook name
changes, no shared-memory segment stays leased or outlives the pool, and the surviving engines
take the next cell.

(An engine exiting from inside its own cell is in test_scatter.py and test_pmap.py; a killed
engine before a scatter in test_dataplane.py.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import nbparallel
from nbparallel import session as pool_mod
from nbparallel.errors import PmapError, PoolError, RemoteError

pytestmark = pytest.mark.cluster

VICTIM = 1
SURVIVORS = "0,2"
BIG = np.arange(6 * 100_000, dtype=np.float64).reshape(6, 100_000)  # 4.8 MB: shared memory


def segments(owner: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"nbp-{owner}-*"))


@pytest.fixture
def faulty(monkeypatch):
    """A pool of 3 engines of its own, current for the magics while the test runs. Dead engines
    stay dead: what is tested is how the survivors carry on (test_respawn.py replaces them)."""
    pool = nbparallel.Session(nbparallel.Pool.start(3, respawn=False))
    monkeypatch.setattr(pool_mod, "_current", pool)
    owner = pool.plane.arena.owner
    try:
        yield pool
    finally:
        pool.stop()
    # Every segment this pool made (its arena's and its engines' hand-off segments) is gone,
    # including those of the engine that was killed.
    assert segments(owner) == []


def kill_after(pool, engine: int, seconds: float) -> threading.Timer:
    pid = pool.info(engine)["pid"]
    assert pid > 0 and pid != os.getpid()
    timer = threading.Timer(seconds, os.kill, (pid, signal.SIGKILL))
    timer.start()
    return timer


def kill_when(pool, engine: int, marker: Path, timeout: float = 60.0) -> threading.Thread:
    """SIGKILL ``engine`` as soon as its cell has written ``marker``: it dies in the middle of
    the work, never between two tasks."""
    pid = pool.info(engine)["pid"]
    assert pid > 0 and pid != os.getpid()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def wait_gone(pool, engine: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine in pool.ids:
        assert time.monotonic() < deadline, f"engine {engine} is still registered"
        time.sleep(0.1)


def untouched(ip, before: dict) -> None:
    now = ip.user_ns
    assert set(now) == set(before)
    for name, value in before.items():
        assert now[name] is value, name


def settled(pool) -> None:
    """Nothing of the failed call holds a segment; the victim is gone from the pool."""
    assert pool.plane.arena.leased() == []
    wait_gone(pool, VICTIM)
    assert pool.ids == [0, 2]


def test_kill_during_scatter_names_the_engine_and_stops_the_others(ip, faulty, tmp_path):
    marker = tmp_path / "running"
    ip.user_ns.update(big=BIG, y="before", time=time, marker=str(marker))
    before = dict(ip.user_ns)
    kill_when(faulty, VICTIM, marker)
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match=rf"failed on engine {VICTIM}, rank {VICTIM}: EngineDied") \
            as info:
        ip.run_cell_magic("scatter", "big --gather y --no-dashboard",
                          f"if rank == {VICTIM}:\n    open(marker, 'w').close()\n"
                          "time.sleep(60)\ny = big")
    # The survivors were stopped, not waited for (their cells sleep a minute).
    assert time.perf_counter() - t0 < 20
    assert [f.engine for f in info.value.failures] == [VICTIM]
    untouched(ip, before)
    settled(faulty)
    ip.run_cell_magic("scatter", f"big --gather y --engines {SURVIVORS}", "y = big * 2")
    np.testing.assert_array_equal(ip.user_ns["y"], BIG * 2)
    assert faulty.plane.arena.leased() == []


# The victim marks the first item it gets and sleeps on it until it is killed; the others take
# 0.2 s an item, long enough for the victim to get one.
PMAP_BODY = """
import os, time
if os.getpid() == victim:
    with open(marker + ".part", "w") as f:
        f.write(str(int(v[1])))
    os.rename(marker + ".part", marker)  # whole, the moment it appears
    time.sleep(60)
time.sleep(0.2)
{result}
"""


def test_kill_during_pmap_without_retries_names_the_engine_and_keeps_the_rest(ip, faulty,
                                                                              tmp_path):
    marker = tmp_path / "running"
    items = [np.full(100_000, i, dtype=np.float64) for i in range(24)]  # 800 KB: shared memory
    ip.user_ns.update(items=items, r="before", victim=faulty.info(VICTIM)["pid"],
                      marker=str(marker))
    before = dict(ip.user_ns)
    kill_when(faulty, VICTIM, marker)
    with pytest.raises(PmapError) as info:
        ip.run_cell_magic("pmap", "v in items -> r --chunksize 1 --no-progress",
                          PMAP_BODY.format(result="float(v[0])"))
    err = info.value
    assert int(marker.read_text()) in err.failed  # the item the engine died on
    assert f"on engine {VICTIM}, item" in str(err) and "EngineDied" in str(err)
    assert "--retries 1" in str(err)
    assert err.failed and {f.engine for f in err.failed.values()} == {VICTIM}
    # Every item that was not on the dead engine finished, on the others.
    expected = [float(i) for i in range(24)]
    assert all(err.results[i] == expected[i] for i in range(len(expected)) if i not in err.failed)
    assert len(err.failed) < len(expected)
    untouched(ip, before)
    settled(faulty)
    ip.run_cell_magic("pmap", f"v in items -> r --engines {SURVIVORS} --no-progress",
                      "float(v[0])")
    assert ip.user_ns["r"] == expected


def test_kill_during_pmap_with_retries_completes_every_item_on_the_survivors(ip, faulty,
                                                                            tmp_path):
    marker = tmp_path / "running"
    items = [np.full(100_000, i, dtype=np.float64) for i in range(24)]
    ip.user_ns.update(items=items, r="before", victim=faulty.info(VICTIM)["pid"],
                      marker=str(marker))
    kill_when(faulty, VICTIM, marker)
    ip.run_cell_magic("pmap", "v in items -> r --chunksize 1 --retries 1 --no-progress",
                      PMAP_BODY.format(result="(float(v[0]), os.getpid())"))
    results = ip.user_ns["r"]
    assert [value for value, _ in results] == [float(i) for i in range(24)]
    survivors = {faulty.info(e)["pid"] for e in (0, 2)}
    # The victim finished no item (it slept on its first until killed): every item, the one it
    # died on included, ran on a survivor, and both took a share.
    assert {pid for _, pid in results} == survivors
    assert marker.exists()
    settled(faulty)


SLOW_STAGE = """
import time

def forward(x, ctx):
    time.sleep(0.25)
    return x + 1

def backward(grad, ctx):
    time.sleep(0.25)
    return grad

def loss(y, t):
    return float(((y - t) ** 2).sum()), 2 * (y - t)
"""


@pytest.mark.parametrize("command", [
    "run --input x --microbatches 8 --out y --no-dashboard",
    "train --input x --target t --microbatches 8 --schedule 1f1b --steps 3 --out y "
    "--no-dashboard",
])
def test_kill_during_a_pipeline_names_the_engine_and_the_survivors_take_the_stages(
        ip, faulty, capsys, command):
    # Activations of 800 KB go engine to engine through shared-memory hand-off segments.
    ip.user_ns.update(x=np.zeros((8, 100_000)), t=np.ones((8, 100_000)), y="before")
    ip.run_cell_magic("stage", "a --engine 0", SLOW_STAGE)
    ip.run_cell_magic("stage", f"b --engine {VICTIM}", SLOW_STAGE)
    before = dict(ip.user_ns)
    kill_after(faulty, VICTIM, 1.0)
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match=rf"the pipeline failed on engine {VICTIM}, rank 1: "
                                          rf"EngineDied"):
        ip.run_line_magic("pipeline", command)
    assert time.perf_counter() - t0 < 15  # the stage on engine 0 was stopped, not waited for
    untouched(ip, before)
    settled(faulty)
    # The lost stage is named before anything is sent, not found missing half-way through.
    with pytest.raises(PoolError, match=rf"stage\(s\) `b` \(engine {VICTIM}\) lived on an engine "
                                        rf"that has stopped.*K one of 0,2"):
        ip.run_line_magic("pipeline", command)
    untouched(ip, before)
    # Defined again on a survivor, the pipeline runs.
    ip.run_cell_magic("stage", "b --engine 2", SLOW_STAGE)
    ip.run_line_magic("pipeline", "run --input x --microbatches 2 --out y --no-dashboard")
    np.testing.assert_array_equal(ip.user_ns["y"], np.full((8, 100_000), 2.0))
    assert faulty.plane.arena.leased() == []
    ip.run_line_magic("pipeline", "clear")  # forgets the stages on engines 0 and 2
    assert faulty.pipeline.stages == {}
    capsys.readouterr()


def test_a_stopped_pool_leaves_other_pools_segments_alone(pool):
    """Stopping one pool removes its own segments, never those of another pool of this kernel."""
    mine = nbparallel.scatter("y = x", {"x": BIG}, gather=["y"], engines=[0, 1], pool=pool)["y"]
    kept = set(pool.plane.arena.names())
    assert kept
    other = nbparallel.Session(nbparallel.Pool.start(1))
    try:
        nbparallel.scatter("y = x", {"x": BIG}, gather=["y"], pool=other)
        theirs = set(other.plane.arena.names())
        assert theirs and not theirs & kept
    finally:
        other.stop()
    present = {p.name for p in Path("/dev/shm").glob(f"nbp-{os.getpid()}-*")}
    assert kept <= present and not theirs & present
    # An engine that never mapped the session pool's warm segments still opens them by name.
    out = nbparallel.scatter("y = x + 1", {"x": BIG}, gather=["y"], engines=[2], pool=pool)
    np.testing.assert_array_equal(out["y"], BIG + 1)
    np.testing.assert_array_equal(mine, BIG)


EXITS_WITHOUT_STOP = """
import json, os
import numpy as np
import nbparallel
from nbparallel import pipeline

pool = nbparallel.Session(nbparallel.Pool.start(2))
# The watchdog may see the engines go before the kernel, and then removes nothing: take it out.
pool.pool._reaper.kill()
pool.pool._reaper.wait()
pipeline.stage("wide", "def forward(x, ctx):\\n    return np.repeat(x, 50_000, axis=1)",
               engine=0, namespace={"np": np}, pool=pool)
pipeline.stage("sum", "def forward(x, ctx):\\n    return x.sum(axis=1)", engine=1, pool=pool)
assert pipeline.run(np.ones((8, 1)), 2, pool=pool).tolist() == [50_000.0] * 8
nbparallel.scatter("y = x", {"x": np.ones(1_000_000)}, gather=["y"], pool=pool, namespace={})
from nbparallel.dataplane.transports.shm import outbox_segments
print(json.dumps({"pid": os.getpid(), "engines": [pool.info(e)["pid"] for e in pool.ids],
                  "handoff": pool.pool.apply(0, outbox_segments).get(),
                  "arena": pool.plane.arena.names()}))
# ... and the script ends without pool.stop()
"""


def test_a_kernel_that_exits_without_stopping_its_pool_leaves_no_segment(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(EXITS_WITHOUT_STOP)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        assert seen["handoff"] and seen["arena"]  # the engines' segments and the notebook's
        left = sorted(p.name for p in Path("/dev/shm").glob(f"nbp-{seen['pid']}-*"))
        assert left == []
    finally:
        for pid in seen["engines"]:  # ipyparallel stops them at exit; make sure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in Path("/dev/shm").glob(f"nbp-{seen['pid']}-*"):
            path.unlink()


def test_status_shows_a_dead_engine_and_restart_brings_the_pool_back(faulty, ip, capsys):
    pid = faulty.info(VICTIM)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_gone(faulty, VICTIM)
    ip.run_line_magic("nbp", "status")
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
    assert "dead" in rows[str(VICTIM)] and str(pid) in rows[str(VICTIM)]
    assert all("dead" not in rows[str(e)] for e in (0, 2))
    ip.run_line_magic("nbp", "restart")
    fresh = pool_mod.current()
    try:
        assert fresh is not faulty and len(fresh.ids) == 3
        assert all(row.alive for row in fresh.status())
        ip.user_ns.update(a=np.arange(6))
        ip.run_cell_magic("scatter", "a --gather c", "c = a * 2")
        np.testing.assert_array_equal(ip.user_ns["c"], np.arange(6) * 2)
    finally:
        pool_mod.stop()


def test_an_engine_dying_during_a_direct_gather_is_named_within_seconds(ip, faulty, monkeypatch):
    """The victim dies just as the notebook asks its channel for its part: the wait ends when
    the process is gone (not after the channel's 60 s), with an nbparallel error naming it, and
    the parts the other engines offered are dropped on them, not kept until the pool stops."""
    from nbparallel.dataplane import remote
    from nbparallel.dataplane.transports.direct import Direct
    from nbparallel.errors import TransferError

    victim, survivors = 0, [1, 2]
    real = Direct.fetch

    def fetch(self, engine, dest, inline):
        if engine == victim:
            os.kill(faulty.info(victim)["pid"], signal.SIGKILL)
        return real(self, engine, dest, inline)

    monkeypatch.setattr(Direct, "fetch", fetch)
    ip.user_ns.update(big=BIG, y="before")
    before = dict(ip.user_ns)
    t0 = time.perf_counter()
    with pytest.raises(TransferError, match=rf"engine {victim} \(pid \d+\) has stopped") as info:
        ip.run_cell_magic("scatter", "big --gather y --transport direct --no-dashboard", "y = big + 1")
    assert time.perf_counter() - t0 < 5
    assert "Traceback" not in str(info.value)
    untouched(ip, before)
    monkeypatch.setattr(Direct, "fetch", real)
    ip.run_cell_magic("scatter", "big --gather y --engines 1-2", "y = big * 2")  # carries the chores
    np.testing.assert_array_equal(ip.user_ns["y"], BIG * 2)
    stats = faulty.pool.call_each(survivors, remote.channel_stats, timeout=30)
    assert {e: s["pending"] for e, s in stats.items()} == {1: 0, 2: 0}


SHM_FULL = r"""
import numpy as np
import nbparallel
from nbparallel.dataplane import shm

session = nbparallel.start(2)
# Another process took the space after the arena looked: statvfs still says it is there.
shm.free_bytes = lambda: 1 << 40
a = np.arange(12_000_000, dtype=np.float64)          # 96 MB, on a 64 MB /dev/shm
before = a.copy()
out = nbparallel.scatter("b = a * 2", {"a": a}, gather=["b"], pool=session)
assert np.array_equal(out["b"], before * 2) and np.array_equal(a, before)
moved = {(t.kind, t.transport) for t in session.transfers.since(0)[0]}
print("TRANSPORTS", sorted(moved))
session.stop()
print("ALIVE")
"""


def test_a_full_dev_shm_is_a_fallback_not_a_sigbus(tmp_path):
    """/dev/shm smaller than the payload, and the free-space check fooled (as when another
    process fills it between the check and the write): the segment's pages are reserved when it
    is made, so the transfer falls back to the direct channels and the kernel lives."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("unshare"):
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root with util-linux: the mount namespace must work")
        pytest.skip("a private tmpfs on /dev/shm needs root and unshare")
    script = tmp_path / "full.py"
    script.write_text(SHM_FULL)
    env = dict(os.environ, NBPARALLEL_SHM_BUDGET="1G", NBPARALLEL_DASHBOARD="0")
    run = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         "mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && exec \"$@\"", "sh",
         sys.executable, str(script)],
        capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, f"rc {run.returncode} (-7 is SIGBUS)\n{run.stdout}\n{run.stderr}"
    assert "ALIVE" in run.stdout
    assert "('scatter', 'direct')" in run.stdout
