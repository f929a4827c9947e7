"""Telemetry on real engines: the spans magics record, live pipeline batches, trace, memory."""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import pytest

import nbparallel
from nbparallel import pipeline
from nbparallel.telemetry.records import Ring, Sample, Span, Transfer

pytestmark = pytest.mark.cluster


def _new_spans(pool, cursor):
    return pool.monitor.spans.since(cursor)[0]


def test_pmap_and_scatter_record_one_span_per_chunk_and_per_engine(pool):
    mon = pool.monitor
    cursor = mon.spans.cursor
    t0 = time.time()
    nbparallel.pmap("x + 1", "x", range(300), pool=pool, show_progress=False)
    nbparallel.scatter("y = x", {"x": np.arange(10)}, gather=["y"], pool=pool)
    t1 = time.time()
    spans = _new_spans(pool, cursor)
    chunks = [s for s in spans if s.kind == "pmap"]
    assert sum(s.items for s in chunks) == 300
    cells = [s for s in spans if s.kind == "scatter"]
    assert sorted(s.engine for s in cells) == sorted(pool.ids)
    for s in spans:
        assert s.engine in pool.ids and t0 - 0.01 <= s.start <= s.end <= t1 + 0.01, s


class _Observer:
    """A test's view of what a dashboard is fed, and when (the monitor feeds any such object)."""

    def __init__(self):
        self.fed: list[tuple[float, int]] = []
        self.runs: dict[str, tuple] = {}

    def feed(self, transfers=(), spans=(), samples=()):
        spans = list(spans)
        if spans:
            self.fed.append((time.monotonic(), len(spans)))

    def pipeline(self, run, schedule, theory, peak_stash, labels=None):
        self.runs[run] = (schedule, theory, peak_stash)

    def tick(self, force=False):
        return False

    def finish(self):
        pass


def test_pipeline_spans_arrive_while_the_run_is_going(pool):
    pool.pipeline.clear()
    sleepy = "import time\ndef forward(x, ctx):\n    time.sleep(0.1)\n    return x"
    pipeline.stage("a", sleepy, engine=pool.ids[0], pool=pool)
    pipeline.stage("b", sleepy, engine=pool.ids[1], pool=pool)
    watcher = _Observer()
    pool.monitor._attach(watcher, history=False)
    try:
        started = time.monotonic()
        pipeline.run(np.zeros((10, 2)), 10, pool=pool)
        ended = time.monotonic()
    finally:
        pool.monitor._detach(watcher)
    result = pool.pipeline.last[-1]
    # Two seconds of work: batches came in during the run, not all at its end.
    during = [n for t, n in watcher.fed if t < ended - 0.3]
    assert sum(during) >= 5, watcher.fed
    assert sum(n for _, n in watcher.fed) == 20  # every op exactly once
    assert watcher.runs[result.run][0] == "gpipe"
    recorded = [s for s in pool.monitor.spans.since(0)[0] if s.run == result.run]
    assert sorted((s.stage, s.microbatch) for s in recorded) == sorted(
        (st, j) for _, _, st, j, _, _ in result.spans)
    assert started <= ended


def test_telemetry_off_records_no_spans_but_still_counts_bytes(pool):
    cursor, tcursor = pool.monitor.spans.cursor, pool.transfers.cursor
    was = nbparallel.config.telemetry
    nbparallel.config.telemetry = False
    try:
        nbparallel.scatter("y = x", {"x": np.ones(100_000)}, gather=["y"], pool=pool)
    finally:
        nbparallel.config.telemetry = was
    assert _new_spans(pool, cursor) == []
    assert sum(t.nbytes for t in pool.transfers.since(tcursor)[0]) >= 2 * 800_000


def test_local_engines_share_the_notebook_clock(pool):
    for eid in pool.ids:
        assert pool.monitor.offset(eid) == 0.0
        # The estimate used for engines on other hosts agrees: one clock, offset within 20 ms.
        assert abs(pool.monitor._measure(eid)) < 0.02


def test_nbp_trace_save_and_monitor(ip, pool, tmp_path, capsys):
    nbparallel.pmap("x", "x", range(20), pool=pool, show_progress=False)
    path = tmp_path / "trace.json"
    ip.run_line_magic("nbp", f"trace save {path}")
    assert "spans" in capsys.readouterr().out
    trace = json.loads(path.read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert events and all({"ph", "ts", "dur", "pid", "tid", "name"} <= set(e) for e in events)
    board = pool.monitor.open()
    try:
        assert f"{len(pool.ids)} engines" in board.text()
    finally:
        pool.monitor._detach(board)
    ip.run_line_magic("nbp", "dashboard off")
    assert nbparallel.config.dashboard is False
    ip.run_line_magic("nbp", "dashboard on")
    assert nbparallel.config.dashboard is True


def test_memory_stays_bounded_under_100000_events():
    """The monitor's rings and one dashboard's state, full: the bound the README documents."""
    from nbparallel.widgets.dashboard import Dashboard

    tracemalloc.start()
    try:
        spans, samples, transfers = Ring(100_000), Ring(10_000), Ring(10_000)
        board = Dashboard([0, 1, 2, 3], live=False)
        now = time.time()
        for i in range(150_000):
            s = Span(i % 4, "pmap", now + i * 1e-3, now + i * 1e-3 + 5e-4, items=3)
            t = Transfer(i % 4, "scatter", "out", "shm", 1000, now + i * 1e-3)
            spans.append(s)
            transfers.append(t)
            if i % 10 == 0:
                samples.append(Sample(i % 4, now + i * 1e-3, 50.0, 1))
            board.feed(transfers=[t], spans=[s])
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"100,000-event bound: {used / 2**20:.1f} MiB held")
    assert used < 32 * 2**20, f"{used / 2**20:.1f} MiB"
