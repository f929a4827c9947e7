"""%%pmap on real engines: the contract, balancing, retries on a dead engine, failures kept."""

import time

import pytest

import nbparallel
from nbparallel.errors import PmapError, UsageError
from nbparallel.pmap import Chunker

pytestmark = pytest.mark.cluster


def test_contract_example_on_two_engines(ip):
    ip.run_cell_magic("pmap", "x in range(1000) -> squares --engines 0-1", "x * x")
    assert ip.user_ns["squares"] == [x * x for x in range(1000)]


def test_body_sees_notebook_names_and_tuple_targets(ip):
    ip.run_cell("offset = 100\ndef f(v):\n    return v + offset")
    ip.run_cell_magic("pmap", "i, s in enumerate(['a', 'bb', 'ccc']) -> out",
                      "n = len(s)\nf(i * n)")
    assert ip.user_ns["out"] == [100, 102, 106]


def test_statement_body_gives_none_and_unordered_gives_every_result(ip):
    ip.run_cell_magic("pmap", "x in range(5) -> r", "y = x")
    assert ip.user_ns["r"] == [None] * 5
    ip.run_cell_magic("pmap", "x in range(50) -> r --unordered --chunksize 3", "x + 1")
    assert sorted(ip.user_ns["r"]) == list(range(1, 51))


def _drain(chunker, seconds_per_item):
    sizes = []
    while (r := chunker.next()) is not None:
        sizes.append(len(r))
        chunker.record(len(r), len(r) * seconds_per_item)
    return sizes


def test_chunker_covers_every_item_once_with_tiny_items_in_few_chunks():
    sizes = _drain(Chunker(2000, 2), 2e-6)
    assert sum(sizes) == 2000
    assert sizes == [1, 1999]  # measured on one item, then 4 ms of work is not worth splitting
    mid = _drain(Chunker(2000, 2), 1e-3)  # 1 ms items: 100 a chunk, shrinking to the 5 ms floor
    assert sum(mid) == 2000 and max(mid) == 100 and mid[-1] <= 5


def test_chunker_sends_slow_items_one_at_a_time_and_honours_chunksize():
    assert set(_drain(Chunker(40, 2), 0.2)) == {1}
    assert _drain(Chunker(10, 2, chunksize=4), 1.0) == [4, 4, 2]


def test_skewed_items_keep_every_engine_busy_until_near_the_end(pool):
    # 60 items of 5 ms, four of them 50x slower, all at the front where the big chunks are.
    items = list(range(60))
    t0 = time.perf_counter()
    out = nbparallel.pmap("import os, time\ntime.sleep(0.25 if x < 4 else 0.005)\n"
                          "(os.getpid(), time.time())", "x", items, engines=[0, 1],
                          show_progress=False)
    wall = time.perf_counter() - t0
    total_work = 4 * 0.25 + 56 * 0.005
    by_engine = {}
    for pid, end in out:
        by_engine.setdefault(pid, []).append(end)
    assert len(by_engine) == 2
    last = [max(ends) for ends in by_engine.values()]
    # Both engines worked until close to the end, and the wall time is near half the work.
    assert abs(last[0] - last[1]) < 0.3
    assert wall < total_work / 2 + 0.6


def test_failed_items_are_listed_and_successes_kept(ip):
    ip.user_ns["r"] = "before"
    with pytest.raises(PmapError) as info:
        ip.run_cell_magic("pmap", "x in range(20) -> r", "if x in (3, 17):\n    raise KeyError(x)\nx")
    err = info.value
    assert sorted(err.failed) == [3, 17]
    assert "2 of 20 items failed (indices 3, 17)" in str(err)
    assert 'File "<%%pmap cell>", line 2' in str(err) and "raise KeyError(x)" in str(err)
    assert err.results[5] == 5 and err.results[3] is None
    assert ip.user_ns["r"] == "before"


def test_retries_rerun_the_items_of_a_dead_engine_elsewhere(tmp_path):
    # A pool of its own: one engine is killed on purpose.
    pool = nbparallel.Session(nbparallel.Pool.start(2))
    try:
        marker = tmp_path / "died"
        body = ("import os, time\n"
                f"if x == 7 and not os.path.exists({str(marker)!r}):\n"
                f"    open({str(marker)!r}, 'w').close()\n"
                "    os._exit(1)\n"
                "time.sleep(0.01)\n"
                "x * 10")
        out = nbparallel.pmap(body, "x", range(40), chunksize=2, retries=2, pool=pool,
                              show_progress=False)
        assert out == [x * 10 for x in range(40)]
        assert marker.exists()
    finally:
        pool.stop()


@pytest.mark.parametrize("line, message", [
    ("x range(3) -> r", "cannot read `%%pmap x range(3) -> r`"),
    ("x in range(3)", "cannot read"),
    ("1 in range(3) -> r", "'1' is not a loop variable"),
    ("x in range(3) -> 2r", "is not a valid Python name"),
    ("x in range(3) -> r --chunksize 0", "--chunksize must be 1 or more"),
    ("x in range(3) -> r --bogus", "unrecognized arguments: --bogus"),
    ("x in 5 -> r", "needs something to iterate over, but got a int"),
    ("x in range(3) -> r --engines 9", "engine(s) 9, which the pool does not have"),
])
def test_bad_input(ip, line, message):
    ip.user_ns["r"] = "before"
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("pmap", line, "x")
    assert message in str(info.value)
    assert ip.user_ns["r"] == "before"


def test_syntax_error_reported_before_sending(ip):
    with pytest.raises(UsageError, match="syntax error on line 2"):
        ip.run_cell_magic("pmap", "x in range(3) -> r", "y = x\nreturn y +")


def test_items_and_results_of_any_picklable_type_travel(ip):
    """What ipyparallel's own serializer refused: a namedtuple whose class is not where its
    name says (``DataFrame.itertuples()`` makes them, named ``Pandas``), a notebook class, a
    lambda; and results of a class the cell defines."""
    import collections

    Row = collections.namedtuple("Pandas", "Index a b")
    ip.user_ns.update(rows=[Row(i, i * 2, str(i)) for i in range(7)],
                      fns=[lambda x: x + 1, lambda x: x * 3])
    ip.run_cell_magic("pmap", "row in rows -> r", "row.a + int(row.b)")
    assert ip.user_ns["r"] == [3 * i for i in range(7)]
    ip.run_cell_magic("pmap", "f in fns -> r", "f(2)")
    assert ip.user_ns["r"] == [3, 6]
    ip.run_cell_magic("pmap", "x in range(3) -> r",
                      "class Pair:\n    def __init__(self, v):\n        self.v = v\nPair(x)")
    assert [p.v for p in ip.user_ns["r"]] == [0, 1, 2]


def test_an_item_that_cannot_travel_is_named_before_anything_runs(ip, pool):
    import threading

    ip.user_ns.update(items=[1, 2, threading.Lock(), 4], r="before")
    sent = len(pool.pool.client.history)
    with pytest.raises(UsageError, match=r"%%pmap item 2 \(a lock\) cannot be sent to an engine"):
        ip.run_cell_magic("pmap", "x in items -> r", "x")
    assert ip.user_ns["r"] == "before"
    assert len(pool.pool.client.history) == sent


def test_a_map_is_one_ipyparallel_task_per_engine_whatever_its_chunks(pool):
    # Chunks go over the notebook's own channel: the controller sees one task per engine.
    nbparallel.pmap("x", "x", range(4), engines=[0, 1], show_progress=False)  # warm
    client = pool.pool.client
    before = len(client.history)
    out = nbparallel.pmap("x * 2", "x", range(500), chunksize=10, engines=[0, 1],
                          show_progress=False)
    assert out == [x * 2 for x in range(500)]
    assert len(client.history) - before == 2  # 50 chunks, 2 tasks


def test_what_items_print_is_shown_once_labelled_by_engine(pool, capsys):
    body = "import sys\nprint(f'item {x}')\nprint(f'warn {x}', file=sys.stderr)\nx"
    out = nbparallel.pmap(body, "x", range(12), chunksize=3, engines=[0, 1],
                          show_progress=False)
    assert out == list(range(12))
    captured = capsys.readouterr()
    for x in range(12):
        assert len([ln for ln in captured.out.splitlines() if ln.endswith(f"] item {x}")]) == 1
        assert len([ln for ln in captured.err.splitlines() if ln.endswith(f"] warn {x}")]) == 1
    assert all(ln.startswith("[engine ") for ln in captured.out.splitlines())


RAW_OUTPUT = """
import nbparallel
nbparallel.start(2)
body = "import os\\nos.write(2, f'raw {x}\\\\n'.encode())\\nx"
assert nbparallel.pmap(body, "x", range(8), chunksize=2, show_progress=False) == list(range(8))
nbparallel.stop()
"""


def test_what_a_c_library_writes_to_the_file_descriptors_is_shown_too(tmp_path):
    # Engines started under pytest do not read their file descriptors (ipykernel leaves them
    # to pytest's capture), so this map runs in a process of its own.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    done = subprocess.run([sys.executable, "-c", RAW_OUTPUT], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    for x in range(8):
        assert len([ln for ln in lines if ln.startswith("[engine ") and ln.endswith(f"] raw {x}")]) == 1, done.stderr


def test_an_engine_busy_with_other_work_is_worked_around(pool):
    busy = pool.pool.apply(1, time.sleep, 3)  # another cell's (or client's) long task
    t0 = time.perf_counter()
    out = nbparallel.pmap("import os, time\ntime.sleep(0.01)\n(x, os.getpid())", "x",
                          range(40), engines=[0, 1], show_progress=False)
    took = time.perf_counter() - t0
    busy.result(timeout=10)
    assert [x for x, _ in out] == list(range(40))
    assert {pid for _, pid in out} == {pool.info(0)["pid"]}  # engine 0 did them all
    assert took < 2.5  # not held until engine 1 was free at 3 s
    # Engine 1's task found its stop when it started: the next map uses both, and nothing
    # of either map is left on the notebook's channel.
    again = nbparallel.pmap("import os, time\ntime.sleep(0.05)\nos.getpid()", "x", range(20),
                            engines=[0, 1], show_progress=False)
    assert set(again) == {pool.info(0)["pid"], pool.info(1)["pid"]}
    assert pool.plane.server().pending() == 0


def test_chunks_and_results_are_accounted_and_the_channel_stays_on_loopback(pool):
    from nbparallel.dataplane.direct import addresses_of

    cursor = pool.transfers.cursor
    nbparallel.pmap("x + 1", "x", range(300), chunksize=50, engines=[0, 1], show_progress=False)
    moved = pool.transfers.since(cursor)[0]
    out = [t for t in moved if t.kind == "payload"]
    back = [t for t in moved if t.kind == "result"]
    assert len(out) == len(back) == 6
    assert {t.transport for t in out + back} == {"direct"}
    assert {t.direction for t in out} == {"out"} and {t.direction for t in back} == {"in"}
    assert all(t.nbytes > 0 for t in back)
    unix, tcp = addresses_of(pool.plane.server().endpoint)
    assert unix.startswith("ipc://") and tcp.startswith("tcp://127.0.0.1:")


def test_arrays_and_ranges_travel_as_slices_and_iterate_as_here(pool):
    import numpy as np

    grid = np.arange(12.0).reshape(6, 2)
    out = nbparallel.pmap("(type(x).__name__, x.tolist())", "x", grid, chunksize=4,
                          engines=[0, 1], show_progress=False)
    assert out == [("ndarray", row.tolist()) for row in grid]  # rows, as `for x in grid`
    flat = np.arange(10_000, dtype=np.float32)
    kinds = nbparallel.pmap("type(x).__name__", "x", flat, engines=[0, 1], show_progress=False)
    assert set(kinds) == {"float32"}
    assert nbparallel.pmap("x * 3", "x", range(5, 5000, 7), engines=[0, 1],
                           show_progress=False) == [x * 3 for x in range(5, 5000, 7)]
    with pytest.raises(UsageError, match="needs something to iterate over"):
        nbparallel.pmap("x", "x", np.float64(3.0), show_progress=False)
    with pytest.raises(UsageError, match="needs something to iterate over"):
        nbparallel.pmap("x", "x", np.array(3.0), show_progress=False)
