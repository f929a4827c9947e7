"""The data plane on real engines: each transport forced, resident shards, fallback, leaks, security."""

from __future__ import annotations

import gc
import os
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest

import nbparallel
from nbparallel import Resident
from nbparallel.dataplane.direct import choose
from nbparallel.dataplane.plane import DataPlane
from nbparallel.errors import PoolError, RemoteError, UsageError

TWO = "0-1"
BIG = np.arange(3 * 200_000, dtype=np.float64).reshape(200_000, 3)  # 4.8 MB: never inline


def ours() -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"nbp-{os.getpid()}-*"))


def moved(pool, cursor, kinds=("scatter", "broadcast", "gather", "reduce", "payload")):
    new, _ = pool.transfers.since(cursor)
    return [t for t in new if t.kind in kinds]


@pytest.mark.parametrize("transport", ["shm", "direct", "ipp"])
def test_each_transport_gives_the_same_answers(pool, transport):
    w = np.linspace(0, 1, 3)
    cursor = pool.transfers.cursor
    out = nbparallel.scatter(
        "y = a * w + rank\ns = a.sum(axis=0)\nn = len(a)",
        {"a": BIG}, broadcast={"w": w}, gather=["y"], reduce={"s": "sum", "n": "list"},
        engines=TWO, transport=transport, pool=pool,
    )
    lo, hi = BIG[:100_000], BIG[100_000:]
    assert np.array_equal(out["y"], np.concatenate([lo * w, hi * w + 1]))
    assert np.allclose(out["s"], BIG.sum(axis=0))
    assert out["n"] == [100_000, 100_000]
    records = moved(pool, cursor, ("scatter",))
    assert {t.transport for t in records} == {transport}
    assert sorted(t.engine for t in records) == [0, 1]
    assert sum(t.nbytes for t in records) == BIG.nbytes
    gathered = moved(pool, cursor, ("gather",))
    assert sum(t.nbytes for t in gathered) == BIG.nbytes


@pytest.mark.parametrize("transport", ["shm", "direct"])
def test_axis_one_and_halos_through_each_transport(pool, transport):
    img = np.random.default_rng(0).random((64, 40_000))
    out = nbparallel.scatter("lo, hi = halo\nc = x[:, lo:x.shape[1] - hi] * 2", {"x": img},
                             gather=["c"], axis=1, halo=1, engines=TWO, transport=transport,
                             pool=pool)
    assert np.array_equal(out["c"], img * 2)


def test_broadcast_is_shared_and_read_only_over_shm(pool):
    w = np.ones(100_000)
    with pytest.raises(RemoteError, match="read-only"):
        nbparallel.scatter("w[0] = 5", {"a": BIG}, broadcast={"w": w}, engines=TWO,
                           transport="shm", pool=pool)
    assert w[0] == 1
    out = nbparallel.scatter("w = w.copy(); w[0] = rank\nv = w[:2]", {"a": BIG},
                             broadcast={"w": w}, gather=["v"], engines=TWO, pool=pool)
    assert out["v"].tolist() == [0, 1, 1, 1]


def test_scattered_shards_are_writable_and_the_notebook_copy_is_untouched(pool):
    a = BIG.copy()
    out = nbparallel.scatter("x += 1\ny = x", {"x": a}, gather=["y"], engines=TWO, pool=pool)
    assert np.array_equal(a, BIG)
    assert np.array_equal(out["y"], BIG + 1)


def test_gathered_array_is_written_in_place_and_survives_the_segment_reuse(pool):
    first = nbparallel.scatter("y = x * 0 + rank", {"x": BIG}, gather=["y"], engines=TWO,
                               pool=pool)["y"]
    snapshot = first.copy()
    for _ in range(3):  # later calls must not reuse the segment that `first` lives in
        nbparallel.scatter("y = x * 0 + 7", {"x": BIG}, gather=["y"], engines=TWO, pool=pool)
    assert np.array_equal(first, snapshot)


def test_kept_shards_are_reused_without_moving_a_byte(pool):
    out = nbparallel.scatter("y = x * 2", {"x": BIG}, keep=["y"], engines=TWO, pool=pool)
    h = out["y"]
    assert isinstance(h, Resident)
    assert h.shape == BIG.shape and h.dtype == BIG.dtype and h.nbytes == BIG.nbytes
    assert [p["rows"] for p in h.placement()] == [(0, 100_000), (100_000, 200_000)]
    assert [p["engine"] for p in h.placement()] == [0, 1]
    assert "Resident y" in repr(h)

    cursor = pool.transfers.cursor
    s = nbparallel.scatter("s = y.sum(axis=0)", {"y": h}, reduce={"s": "sum"}, engines=TWO,
                           pool=pool)["s"]
    assert np.allclose(s, BIG.sum(axis=0) * 2)
    assert sum(t.nbytes for t in moved(pool, cursor, ("scatter", "broadcast"))) == 0

    assert np.array_equal(np.asarray(h), BIG * 2)


def test_a_handle_on_other_engines_is_repartitioned(pool):
    h = nbparallel.scatter("y = x + 1", {"x": BIG}, keep=["y"], engines=TWO, pool=pool)["y"]
    out = nbparallel.scatter("z = y - 1", {"y": h}, gather=["z"], pool=pool)  # all 3 engines
    assert np.array_equal(out["z"], BIG)


def test_deleting_a_handle_frees_its_shards(pool):
    from nbparallel.dataplane.remote import resident_keys

    h = nbparallel.scatter("y = x", {"x": BIG}, keep=["y"], engines=TWO, pool=pool)["y"]
    key = h.key
    assert all(key in keys for keys in pool.pool.client[[0, 1]].apply_sync(resident_keys))
    del h
    gc.collect()
    nbparallel.scatter("pass", {"x": np.arange(4)}, engines=TWO, pool=pool)  # carries the frees
    assert not any(key in keys for keys in pool.pool.client[[0, 1]].apply_sync(resident_keys))


def test_tiny_shared_memory_budget_falls_back_to_direct(pool, monkeypatch):
    monkeypatch.setenv("NBPARALLEL_SHM_BUDGET", "1M")
    small = nbparallel.Session(nbparallel.Pool(pool.pool.client))
    try:
        cursor = small.transfers.cursor
        out = nbparallel.scatter("y = x + 1", {"x": BIG}, gather=["y"], engines=TWO, pool=small)
        assert np.array_equal(out["y"], BIG + 1)
        assert {t.transport for t in moved(small, cursor, ("scatter",))} == {"direct"}
        with pytest.raises(UsageError, match="budget"):
            nbparallel.scatter("pass", {"x": BIG}, engines=TWO, transport="shm", pool=small)
    finally:
        small.plane.close()


def test_no_segment_is_left_leased_after_errors(pool):
    arena = pool.plane.arena
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        nbparallel.scatter("y = x / 0 if rank else 1 // 0", {"x": BIG}, gather=["y"],
                           engines=TWO, pool=pool)
    with pytest.raises(UsageError):
        nbparallel.scatter("z = 1", {"x": BIG}, gather=["y"], engines=TWO, pool=pool)
    assert arena.leased() == []
    for path in ours():
        mode = path.stat().st_mode
        assert stat.S_IMODE(mode) == 0o600, path
        assert len(path.name.rsplit("-", 1)[1]) == 32  # 128 random bits


def test_file_descriptors_and_segments_stay_flat_over_500_calls(pool):
    x = np.ones(20_000)  # 160 KB: through shared memory every time
    for _ in range(20):
        nbparallel.scatter("y = x", {"x": x}, gather=["y"], engines=TWO, pool=pool)
    fds, segs = len(os.listdir("/proc/self/fd")), len(ours())
    for _ in range(500):
        nbparallel.scatter("y = x", {"x": x}, gather=["y"], engines=TWO, pool=pool)
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert len(ours()) <= segs + 2


def test_pmap_payloads_travel_through_shared_memory(pool):
    items = [np.full(50_000, i, dtype=np.float64) for i in range(12)]
    cursor = pool.transfers.cursor
    out = nbparallel.pmap("float(x.sum())", "x", items, pool=pool, show_progress=False)
    assert out == [50_000.0 * i for i in range(12)]
    payloads = moved(pool, cursor, ("payload",))
    assert {t.transport for t in payloads} == {"shm"}
    assert sum(t.nbytes for t in payloads) == sum(i.nbytes for i in items)


def test_forged_messages_are_refused_by_the_engine(pool):
    import pickle

    import zmq

    from nbparallel.dataplane.direct import addresses_of

    channel = pool.plane.channel(0)
    unix, tcp = addresses_of(channel.endpoint)
    assert unix.startswith("ipc://") and tcp.startswith("tcp://127.0.0.1:")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(choose(channel.endpoint))  # a process of this user may open the socket
    evil = pickle.dumps(print)  # would run code if it were ever unpickled
    sock.send_multipart([b"nbp1", b"put", b"forged", b"\0" * 32, evil])
    assert sock.poll(5000)
    reply = sock.recv_multipart()
    assert reply[1] == b"err"
    sock.close(0)
    ctx.term()

    from nbparallel.dataplane.remote import channel_stats

    assert pool.pool.client[0].apply_sync(channel_stats)["refused"] >= 1


def test_pool_stop_removes_every_segment_and_invalidates_handles():
    pool = nbparallel.Session(nbparallel.Pool.start(2))
    try:
        h = nbparallel.scatter("y = x", {"x": BIG}, keep=["y"], pool=pool)["y"]
        nbparallel.scatter("y = x", {"x": BIG}, gather=["y"], pool=pool)
        # Each engine's channel listens on a Unix socket in a folder of its own.
        folders = [Path(choose(pool.plane.endpoint(e)).removeprefix("ipc://")).parent
                   for e in pool.ids]
        assert all(f.is_dir() for f in folders)
        names = set(pool.plane.arena.names())
        assert names and names <= {p.name for p in ours()}
        eid = pool.ids[1]
        pid = pool.status()[1].pid
        os.kill(pid, signal.SIGKILL)
        # Depending on when the controller notices the death, the dead engine is reported by
        # the run (RemoteError) or refused before sending (UsageError, PoolError); all name it.
        with pytest.raises((RemoteError, UsageError, PoolError), match=rf"engine(\(s\))? {eid}"):
            nbparallel.scatter("time.sleep(0.5)\ny = x", {"x": BIG}, gather=["y"], pool=pool,
                               engines=[0, eid], namespace={"time": time})
    finally:
        pool.stop()
    assert not names & {p.name for p in ours()}
    assert not any(f.exists() for f in folders)  # the killed engine's and the stopped one's
    with pytest.raises(PoolError, match="stopped"):
        np.asarray(h)


def test_dataplane_rejects_unknown_transport(pool):
    with pytest.raises(UsageError, match="unknown transport"):
        nbparallel.scatter("pass", {"x": BIG}, transport="carrier-pigeon", pool=pool)
    assert isinstance(pool.plane, DataPlane)


def test_magic_options_keep_and_transport(ip):
    ip.user_ns["x"] = BIG.copy()
    ip.run_cell_magic("scatter", "x --keep y --transport direct --engines 0-1", "y = x + 1")
    h = ip.user_ns["y"]
    assert isinstance(h, Resident) and h.engines == [0, 1]
    ip.run_cell_magic("scatter", "y --reduce s=sum --engines 0-1", "s = y.sum(axis=0)")
    assert np.allclose(ip.user_ns["s"], (BIG + 1).sum(axis=0))
    with pytest.raises(UsageError, match="asked for twice"):
        ip.run_cell_magic("scatter", "x --gather y --keep y", "y = x")


def test_list_reduce_parts_survive_the_segment_reuse(pool):
    out = nbparallel.scatter("p = x * 0 + rank", {"x": BIG}, reduce={"p": "list"}, engines=TWO,
                             pool=pool)["p"]
    snapshot = [part.copy() for part in out]
    for _ in range(3):  # the parts live in a shared segment that must not be handed out again
        nbparallel.scatter("p = x * 0 + 9", {"x": BIG}, reduce={"p": "list"}, engines=TWO,
                           pool=pool)
    assert all(np.array_equal(a, b) for a, b in zip(out, snapshot))


def test_a_gather_that_falls_back_to_direct_reaches_fresh_engines(monkeypatch):
    """Scatter fits the budget, the second gather does not: its engines must get a channel first.

    Fresh engines, since an engine whose channel an earlier test started would hide the bug.
    """
    monkeypatch.setenv("NBPARALLEL_SHM_BUDGET", "3M")
    fresh = nbparallel.Session(nbparallel.Pool.start(2))
    try:
        x = np.ones(125_000)  # 1 MB
        kept = [nbparallel.scatter("y = x * 2", {"x": x}, gather=["y"], pool=fresh)["y"]
                for _ in range(3)]  # each result holds its segment while we keep it
        assert all(np.array_equal(k, x * 2) for k in kept)
        transports = {t.transport for t in fresh.transfers.since(0)[0] if t.kind == "gather"}
        assert "direct" in transports
    finally:
        fresh.stop()
