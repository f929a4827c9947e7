"""``comm`` in %%scatter cells, on real engines: every collective against NumPy in the notebook,
both backends, and every way a collective can go wrong (mismatch, failure, timeout, Ctrl-C)."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nbparallel import partition
from nbparallel.errors import RemoteError, UsageError

pytestmark = pytest.mark.cluster

BACKENDS = ["auto", "direct"]  # auto: shared memory between these local engines

COLLECTIVES = """
import numpy as np
big = np.arange(100_000, dtype=np.float64) * (rank + 1)       # 800 KB: reduced block by block
small = np.arange(5.0) + rank
out = dict(
    rank=(comm.rank, comm.size),
    number=comm.allreduce(rank + 1),
    maximum=comm.allreduce(float(rank), op="max"),
    small=comm.allreduce(small),
    big=comm.allreduce(big),
    prod=comm.allreduce(np.full(3, 2.0), op="prod"),
    reduced=comm.reduce(small, root=1),
    bcast=comm.bcast({"from": rank} if rank == 0 else None),
    bcast_big=comm.bcast(big if rank == 2 else None, root=2),
    allgather=comm.allgather(rank * 10),
    gather=comm.gather(str(rank), root=0),
    scatter=comm.scatter([i * i for i in range(size)] if rank == 1 else None, root=1),
    alltoall=comm.alltoall([(rank, j) for j in range(size)]),
    reduce_scatter=comm.reduce_scatter(np.arange(10.0) * (rank + 1)),
)
comm.barrier()
inplace = np.full(70_000, float(rank + 1))
comm.allreduce(inplace, out=inplace)
out["inplace"] = float(inplace[-1])
comm.send(("hello", rank), dest=(rank + 1) % size, tag=3)
out["ring"] = comm.recv(source=(rank - 1) % size, tag=3)
out["shift"] = comm.sendrecv(rank, dest=(rank + 1) % size, source=(rank - 1) % size)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_collective_agrees_with_numpy_on_three_engines(ip, backend):
    ip.run_cell_magic("scatter", f"--reduce out=list --comm {backend}", COLLECTIVES)
    outs = ip.user_ns["out"]
    assert len(outs) == 3
    big = np.arange(100_000, dtype=np.float64)
    for r, o in enumerate(outs):
        assert o["rank"] == (r, 3)
        assert o["number"] == 6 and o["maximum"] == 2.0
        np.testing.assert_array_equal(o["small"], (np.arange(5.0) * 3 + 3))
        np.testing.assert_array_equal(o["big"], big + big * 2 + big * 3)
        np.testing.assert_array_equal(o["prod"], np.full(3, 8.0))
        if r == 1:
            np.testing.assert_array_equal(o["reduced"], np.arange(5.0) * 3 + 3)
        else:
            assert o["reduced"] is None
        assert o["bcast"] == {"from": 0}
        np.testing.assert_array_equal(o["bcast_big"], big * 3)
        assert o["allgather"] == [0, 10, 20]
        assert o["gather"] == (["0", "1", "2"] if r == 0 else None)
        assert o["scatter"] == r * r
        assert o["alltoall"] == [(i, r) for i in range(3)]
        lo, hi = partition.bounds(10, 3)[r]
        np.testing.assert_array_equal(o["reduce_scatter"], (np.arange(10.0) * 6)[lo:hi])
        assert o["inplace"] == 6.0
        assert o["ring"] == ("hello", (r - 1) % 3)
        assert o["shift"] == (r - 1) % 3
    # Every rank computed its own result: bit for bit the same everywhere.
    assert all(o["big"].tobytes() == outs[0]["big"].tobytes() for o in outs)


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_halo_gives_the_layout_of_scatter_halo(ip, periodic, backend):
    grid = np.random.default_rng(2).random((31, 5))
    ip.user_ns.update(grid=grid)
    ip.run_cell_magic("scatter", f"grid --reduce ext=list --comm {backend}",
                      f"ext = comm.halo(grid, 2, periodic={periodic})")
    shards = partition.split(grid, 3, 0, 2)
    for r, (got, shard) in enumerate(zip(ip.user_ns["ext"], shards)):
        if not periodic:
            np.testing.assert_array_equal(got, shard.value)
        else:
            rows = [b for b in partition.bounds(31, 3)]
            lo, hi = rows[r]
            idx = np.arange(lo - 2, hi + 2) % 31
            np.testing.assert_array_equal(got, grid[idx])


def test_halo_out_writes_in_place(ip):
    ip.run_cell_magic("scatter", "--reduce same=list --engines 0-1", """
import numpy as np
u = np.full((4, 3), float(rank))
ext = np.zeros((5, 3))
res = comm.halo(u, 1, out=ext)
same = (res is ext, ext.tolist())
""")
    (same0, ext0), (same1, ext1) = ip.user_ns["same"]
    assert same0 and same1
    assert ext0 == [[0.0] * 3] * 4 + [[1.0] * 3]
    assert ext1 == [[0.0] * 3] + [[1.0] * 3] * 4


def test_jacobi_on_resident_shards_moves_no_bytes_through_the_notebook(ip, pool):
    n = 64
    u0 = np.zeros((n, n))
    u0[0, :] = 1.0
    ip.user_ns.update(u=u0)
    ip.run_cell_magic("scatter", "u --keep u --engines 0-1", "u = u.copy()")
    steps = """
import numpy as np
for _ in range(20):
    ext = comm.halo(u, 1)
    top = 1 if rank > 0 else 0
    new = u.copy()
    inner = ext[top:top + u.shape[0]]
    lo = 1 if rank == 0 else 0
    hi = u.shape[0] - (1 if rank == size - 1 else 0)
    e = top + np.arange(lo, hi)
    new[lo:hi, 1:-1] = 0.25 * (ext[e - 1, 1:-1] + ext[e + 1, 1:-1] + ext[e, :-2] + ext[e, 2:])
    u = new
"""
    cursor = pool.plane.transfers.cursor
    ip.run_cell_magic("scatter", "u --keep u --engines 0-1", steps)
    new, _ = pool.plane.transfers.since(cursor)
    through_notebook = sum(t.nbytes for t in new if t.kind != "comm")
    between_engines = [t for t in new if t.kind == "comm"]
    assert through_notebook < 2000  # cell and handles only, no array bytes
    assert between_engines and {(t.engine, t.peer) for t in between_engines} == {(0, 1), (1, 0)}
    assert sum(t.nbytes for t in between_engines) >= 2 * 20 * n * 8
    # The same 20 steps in one process:
    ref = u0.copy()
    for _ in range(20):
        nxt = ref.copy()
        nxt[1:-1, 1:-1] = 0.25 * (ref[:-2, 1:-1] + ref[2:, 1:-1] + ref[1:-1, :-2] + ref[1:-1, 2:])
        ref = nxt
    np.testing.assert_array_equal(np.asarray(ip.user_ns["u"]), ref)


def test_collectives_are_spans_of_kind_comm(ip, pool):
    cursor = pool.monitor.spans.cursor
    ip.run_cell_magic("scatter", "--engines 0-1", "for _ in range(5):\n    comm.barrier()")
    spans, _ = pool.monitor.spans.since(cursor)
    assert sorted(s.engine for s in spans if s.kind == "comm") == [0] * 5 + [1] * 5


def _errors(ip, line, cell):
    ip.user_ns["r"] = "before"
    with pytest.raises(RemoteError) as info:
        ip.run_cell_magic("scatter", line + " --gather r", cell + "\nr = [rank]")
    assert ip.user_ns["r"] == "before"
    return info.value


def test_different_collectives_fail_on_every_rank_naming_both_calls(ip):
    err = _errors(ip, "--engines 0-1", "import numpy as np\n"
                                       "x = comm.bcast(1) if rank == 0 else comm.allreduce(1.0)")
    assert {f.ename for f in err.failures} == {"CommError"} and len(err.failures) == 2
    assert "rank 0 called bcast(root=0) (call #1 at line 2)" in str(err)
    assert "rank 1 called allreduce(op=sum) (call #1 at line 2)" in str(err)
    assert "comm/" not in err.failures[0].traceback  # ends at the user's line


def test_different_shapes_fail_on_every_rank(ip):
    err = _errors(ip, "--engines 0-1", "import numpy as np\ncomm.allreduce(np.ones(3 + rank))")
    assert len(err.failures) == 2
    assert "float64 (3,)" in str(err) and "float64 (4,)" in str(err)


def test_an_exception_on_one_rank_releases_the_others_and_is_shown_first(ip):
    t0 = time.perf_counter()
    err = _errors(ip, "", "import time\nif rank == 1:\n    raise ValueError('bad shard')\n"
                          "comm.barrier()")
    assert time.perf_counter() - t0 < 5
    first = err.failures[0]
    assert (first.ename, first.evalue, first.rank) == ("ValueError", "bad shard", 1)
    released = err.failures[1:]
    assert {f.ename for f in released} == {"PeerFailed"} and {f.rank for f in released} == {0, 2}
    assert "rank 1 failed while rank 0 waited in barrier() (call #1 at line 4): " \
           "ValueError: bad shard (line 3)" in released[0].evalue


def test_a_rank_that_skips_a_collective_is_reported_not_waited_for(ip):
    t0 = time.perf_counter()
    err = _errors(ip, "--engines 0-1", "if rank == 0:\n    comm.barrier()")
    assert time.perf_counter() - t0 < 5
    assert err.failures[0].ename == "PeerFailed"
    assert "rank 1 finished the cell without calling barrier()" in str(err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_timeout_says_who_has_not_arrived_and_where_each_rank_is(ip, backend):
    t0 = time.perf_counter()
    err = _errors(ip, f"--engines 0-1 --comm-timeout 1 --comm {backend}",
                  "import time\nif rank == 1:\n    time.sleep(4)\ncomm.barrier()")
    assert time.perf_counter() - t0 < 8
    timeout = [f for f in err.failures if f.ename == "CommTimeout"]
    assert timeout and timeout[0].rank == 0
    assert "rank 0 waited 1 s in barrier() (call #1 at line 4) for rank(s) 1" in timeout[0].evalue
    if backend == "auto":
        assert "rank 1 is running its own code (its last comm call: no comm call yet)" in str(err)


@pytest.mark.parametrize("cell, message", [
    ("comm.allreduce(1, op='mean')", "unknown op 'mean'"),
    ("comm.bcast(1, root=5)", "root=5 is not a rank of this comm, which has ranks 0 to 1"),
    ("comm.alltoall([1, 2, 3])", "needs a list of exactly 2 items"),
    ("import numpy as np\ncomm.halo(np.ones(3 + 4 * rank), 5)",
     "k=5 rows were asked for, but rank 0 has only 3"),
    ("import numpy as np\ncomm.allreduce(np.ones(3), out=np.ones(4))", "out= must be a float64"),
])
def test_bad_arguments_are_one_paragraph_errors(ip, cell, message):
    err = _errors(ip, "--engines 0-1", cell)
    assert message in str(err)
    assert "\n\n" not in err.failures[0].evalue


def test_comm_in_pmap_is_a_usage_error(ip):
    ip.user_ns["r"] = "before"
    with pytest.raises(UsageError, match="`comm` is not defined in %%pmap"):
        ip.run_cell_magic("pmap", "x in range(3) -> r", "comm.allreduce(x)")
    assert ip.user_ns["r"] == "before"


def test_comm_timeout_is_checked_before_anything_runs(ip):
    with pytest.raises(UsageError, match="comm timeout must be a number of seconds above 0"):
        ip.run_cell_magic("scatter", "--comm-timeout 0", "comm.barrier()")


def test_ctrl_c_in_a_collective_frees_every_rank_within_two_seconds(ip, pool):
    ip.user_ns["r"] = "before"
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("scatter", "--gather r",
                          "import time\nif rank == 0:\n    time.sleep(60)\ncomm.barrier()\nr = [1]")
    assert time.perf_counter() - t0 < 3.0
    assert ip.user_ns["r"] == "before"
    ip.run_cell_magic("scatter", "--reduce r=sum", "r = comm.allreduce(1)")
    assert ip.user_ns["r"] == 9
    assert _comm_segments(pool) == []


def _comm_segments(pool):
    """Segments of this pool's comms: ``nbp-<arena owner>-<comm id>-<random>`` (the arena's own
    and the engines' hand-off segments have no comm id)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"nbp-{pool.plane.arena.owner}-*-*"))


def test_no_segment_is_left_after_runs_errors_and_timeouts(ip, pool):
    seen = []
    ip.user_ns["seen"] = None
    ip.run_cell_magic("scatter", "--reduce seen=list",
                      "import numpy as np, os\ncomm.allreduce(np.ones(1 << 20))\n"
                      "seen = sorted(n for n in os.listdir('/dev/shm') if n.count('-') >= 4)")
    seen = {n for names in ip.user_ns["seen"] for n in names}
    assert any(n.startswith(f"nbp-{pool.plane.arena.owner}-") for n in seen)  # it saw them live
    assert _comm_segments(pool) == []
    _errors(ip, "", "import numpy as np\nif rank == 2:\n    raise KeyError('x')\n"
                    "comm.allreduce(np.ones(1 << 20))")
    assert _comm_segments(pool) == []
    _errors(ip, "--comm-timeout 0.5", "import numpy as np, time\ncomm.allreduce(np.ones(1 << 20))\n"
                                      "if rank == 0:\n    time.sleep(2)\ncomm.barrier()")
    assert _comm_segments(pool) == []


def test_comm_in_a_stage_cell_is_a_usage_error(ip, pool):
    with pytest.raises(UsageError, match="`comm` is not defined in %%stage s0"):
        ip.run_cell_magic("stage", "s0 --engine 0", "def forward(x, ctx):\n    return comm.allreduce(x)")
    assert "s0" not in pool.pipeline.stages


# -- allreduce(compress=...): 16 bits on the wire ------------------------------------------------
COMPRESSED = """
import numpy as np
x = (np.arange({n}) % 89 + 1.0) * (rank + 1) / 7.0 + rank / 3
y = comm.allreduce(x, compress={compress!r})
"""


def _parts(n, size):
    """Each rank's ``x`` in COMPRESSED: positive, 0.14 to 41, and mostly not exact in 16 bits."""
    return [(np.arange(n) % 89 + 1.0) * (r + 1) / 7.0 + r / 3 for r in range(size)]


def _comm_bytes(pool, ip, line, cell):
    """Run the cell; the bytes its comm read from peers, as the ranks' CommStats reported them
    (each rank's ``received``, recorded by the notebook as transfers of kind comm)."""
    cursor = pool.plane.transfers.cursor
    ip.run_cell_magic("scatter", line, cell)
    new, _ = pool.plane.transfers.since(cursor)
    return sum(t.nbytes for t in new if t.kind == "comm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("engines", [2, 3])
def test_allreduce_compress_moves_16_bits_and_gives_every_rank_the_same_bits(ip, pool, engines, backend):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from nbparallel.comm.api import LARGE

    lows = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}
    # Per rounding (to nearest) the relative error is below the unit u (2**-8 for bf16's 8
    # significant bits, 2**-11 for fp16's 11): each part is rounded once, the float32 sum of
    # positive parts adds at most (size - 1) * 2**-24, and on the block path the sum is rounded
    # to 16 bits once more. So |y - exact| <= ((1 + u)**2 * (1 + size * 2**-24) - 1) * exact:
    # 2**-7 + 2**-16 + ... for bf16 (the 2**-7 of "two bf16 roundings"), 2**-10 + ... for fp16.
    units = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
    line = f"--reduce y=list --comm {backend}" + (" --engines 0-1" if engines == 2 else "")
    for n in (1000, 100_000):  # 8 KB: one round; 800 KB >= LARGE: reduce-scatter, then gather
        blocks = n * 8 >= LARGE
        parts = _parts(n, engines)
        exact = np.sum(parts, axis=0)
        moved = {}
        for compress in (None, "bf16", "fp16"):
            moved[compress] = _comm_bytes(pool, ip, line, COMPRESSED.format(n=n, compress=compress))
            ys = ip.user_ns["y"]
            assert len(ys) == engines
            assert all(y.dtype == np.float64 and y.shape == (n,) for y in ys)
            assert all(y.tobytes() == ys[0].tobytes() for y in ys), "ranks got different bits"
            if compress is None:
                np.testing.assert_allclose(ys[0], exact, rtol=1e-15)
                continue
            low = lows[compress]
            # What the ranks compute, done here: 16-bit parts, float32 sums in rank order, and
            # on the block path each summed block rounded to 16 bits for the gather round.
            wide = parts[0].astype(low).astype(np.float32)
            for p in parts[1:]:
                wide = wide + p.astype(low).astype(np.float32)
            want = (wide.astype(low) if blocks else wide).astype(np.float64)
            np.testing.assert_array_equal(ys[0], want)
            u = units[compress]
            rel = np.abs(ys[0] - exact) / exact
            assert rel.max() <= (1 + u) ** 2 * (1 + engines * 2.0 ** -24) - 1
            assert rel.max() > u / 4  # it did go through 16 bits
        # float64 to 16 bits: a quarter of the bytes (half of what float32 would move).
        rounds = 2 if blocks else engines  # each element crosses to every other rank once (or twice)
        assert moved[None] == rounds * (engines - 1) * n * 8
        assert moved["bf16"] == moved["fp16"] == moved[None] // 4


def test_allreduce_compress_in_place_on_float32_halves_the_bytes(ip, pool):
    cell = """
import numpy as np
same = []
for n in (1000, 70_000):                                    # 280 KB: the block path
    g = np.full(n, 0.1, np.float32) * (rank + 1)
    r = comm.allreduce(g, out=g{})
    same.append((r is g, g.dtype.name, float(g[0]), float(g[-1])))
"""
    line = "--engines 0-1 --reduce same=list"
    plain = _comm_bytes(pool, ip, line, cell.format(""))
    assert ip.user_ns["same"][0][0] == (True, "float32", *[np.float32(0.3)] * 2)
    packed = _comm_bytes(pool, ip, line, cell.format(", compress='fp16'"))
    assert packed * 2 == plain
    for rank_same in ip.user_ns["same"]:
        for same in rank_same:
            assert same[:2] == (True, "float32")
            assert abs(same[2] - 0.3) <= 0.3 * 2 * 2.0 ** -11 and same[2] == same[3] != 0.3


@pytest.mark.parametrize("n", [1000, 100_000])
def test_compress_on_one_rank_only_is_a_mismatch_not_a_mix(ip, n):
    pytest.importorskip("ml_dtypes")
    err = _errors(ip, "--engines 0-1", f"import numpy as np\nx = np.ones({n})\n"
                  "y = comm.allreduce(x, compress='bf16' if rank == 0 else None)")
    assert {f.ename for f in err.failures} == {"CommError"} and len(err.failures) == 2
    assert f"rank 0 called allreduce(float64 ({n},), op=sum, compress=bf16) (call #1 at line 3)" in str(err)
    assert f"rank 1 called allreduce(float64 ({n},), op=sum) (call #1 at line 3)" in str(err)


@pytest.mark.parametrize("cell, message", [
    ("import numpy as np\ncomm.allreduce(np.arange(4), compress='fp16')",
     "compress='fp16' needs a floating-point array (float64, float32, float16), not an array of int64"),
    ("comm.allreduce(1.5, compress='fp16')", "compress='fp16' needs a floating-point array"),
    ("import numpy as np\ncomm.allreduce(np.ones(3), compress='fp8')",
     "unknown compress='fp8'; use compress=\"bf16\""),
])
def test_bad_compress_arguments_are_one_paragraph_errors(ip, cell, message):
    err = _errors(ip, "--engines 0-1", cell)
    assert {f.ename for f in err.failures} == {"CommError"}
    assert message in str(err)
    assert "\n\n" not in err.failures[0].evalue
