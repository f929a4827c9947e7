"""Telemetry reducers and the trace export: pure, fed synthetic records, no cluster."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc

import pytest

from nbparallel.pipeline import schedule as sched
from nbparallel.pipeline.runtime import RunResult
from nbparallel.telemetry import trace
from nbparallel.telemetry.records import Sample, Span, Transfer
from nbparallel.telemetry.reduce import (
    MEMORY_BOUND,
    Telemetry,
    busy_fraction,
    bytes_by_engine,
    flow,
    gbps,
    pipeline_spans,
    pipeline_view,
    totals,
    union,
)


# -- load ----------------------------------------------------------------------------------------------


def test_union_merges_overlaps_and_drops_empty():
    assert union([(3, 4), (0, 2), (1, 2.5), (5, 5), (2.5, 3)]) == [(0, 4)]
    assert union([(0, 1), (2, 3)]) == [(0, 1), (2, 3)]
    assert union([]) == []


def test_busy_fraction_counts_overlaps_once():
    spans = [Span(0, "pmap", 1.0, 3.0), Span(0, "pmap", 2.0, 4.0), Span(0, "F", 2.5, 3.5)]
    assert busy_fraction(spans, now=5.0, window=5.0) == {0: pytest.approx(3.0 / 5.0)}


def test_busy_fraction_clips_to_window():
    spans = [
        Span(0, "pmap", 0.0, 8.0),    # starts before the window: only 6..8 counts
        Span(0, "pmap", 9.0, 12.0),   # ends after now: only 9..10 counts
        Span(1, "pmap", 1.0, 4.0),    # wholly before the window
        Span(2, "pmap", 11.0, 12.0),  # wholly after now
        Span(3, "pmap", 6.0, 10.0),   # exactly the window
    ]
    got = busy_fraction(spans, now=10.0, window=4.0)
    assert got == {0: pytest.approx(3.0 / 4.0), 3: pytest.approx(1.0)}


def test_busy_fraction_per_engine():
    spans = [Span(e, "scatter", 10.0 - e, 10.0) for e in range(4)]
    got = busy_fraction(spans, now=10.0, window=5.0)
    assert got == {1: pytest.approx(0.2), 2: pytest.approx(0.4), 3: pytest.approx(0.6)}  # 0: empty span


def test_telemetry_busy_lists_idle_engines_with_zero():
    tel = Telemetry(engines=[0, 1, 2])
    tel.ingest(spans=[Span(1, "pmap", 8.0, 10.0)])
    assert tel.busy(now=10.0, window=5.0) == {0: 0.0, 1: pytest.approx(0.4), 2: 0.0}


# -- bytes ---------------------------------------------------------------------------------------------


TRANSFERS = [
    Transfer(0, "scatter", "out", "shm", 1000, 1.0),
    Transfer(0, "scatter", "out", "shm", 500, 1.5),
    Transfer(0, "broadcast", "out", "shm", 200, 1.5),
    Transfer(1, "scatter", "out", "direct", 1000, 1.6),
    Transfer(0, "gather", "in", "shm", 300, 2.0),
    Transfer(1, "result", "in", "ipp", 7, 2.2),
    Transfer(1, "stage", "out", "direct", 4000, 2.5),
    Transfer(0, "stage", "in", "direct", 10, 2.6),
]


def test_flow_names_stage_as_engine_to_engine():
    assert flow("scatter", "out") == "out"
    assert flow("gather", "in") == "in"
    assert flow("stage", "out") == flow("stage", "in") == "stage"


def test_bytes_by_engine_and_kind():
    by = bytes_by_engine(TRANSFERS)
    assert by == {
        0: {("scatter", "out"): 1500, ("broadcast", "out"): 200, ("gather", "in"): 300,
            ("stage", "in"): 10},
        1: {("scatter", "out"): 1000, ("result", "in"): 7, ("stage", "out"): 4000},
    }
    assert totals(by) == {"out": 2700, "in": 307, "stage": 4010, "all": 7017}


def test_gbps_over_a_window():
    # (1.5, 2.5]: 500 + 200 = 700 at 1.5 excluded, so 1000 + 300 + 7 + 4000 in one second.
    assert gbps(TRANSFERS, now=2.5, window=1.0) == pytest.approx(5307 / 1e9)
    assert gbps(TRANSFERS, now=10.0, window=1.0) == 0.0
    assert gbps(TRANSFERS, now=3.0, window=3.0) == pytest.approx(7017 / 3 / 1e9)


def test_telemetry_matches_the_pure_reducers():
    tel = Telemetry()
    for batch in (TRANSFERS[:3], TRANSFERS[3:]):
        tel.ingest(transfers=batch)
    assert tel.by_engine() == bytes_by_engine(TRANSFERS)
    assert tel.totals() == totals(bytes_by_engine(TRANSFERS))
    assert tel.total_bytes == 7017
    assert tel.engines == {0, 1}
    # Times on bucket edges, so the bucketed rate is exact.
    assert tel.gbps(now=2.5, window=1.0) == pytest.approx(gbps(TRANSFERS, now=2.5, window=1.0))
    assert tel.gbps(now=3.0, window=3.0) == pytest.approx(gbps(TRANSFERS, now=3.0, window=3.0))


def test_telemetry_rate_forgets_old_buckets_but_keeps_totals():
    tel = Telemetry(horizon=1.0, bucket=0.1)
    for i in range(1000):
        tel.ingest(transfers=[Transfer(0, "payload", "out", "shm", 1, i * 0.1)])
    assert len(tel._buckets) <= 12
    assert tel.total_bytes == 1000
    assert tel.gbps(now=99.9, window=1.0) == pytest.approx(10 / 1e9)


def test_latest_sample_per_engine():
    tel = Telemetry()
    tel.ingest(samples=[Sample(0, 2.0, 50.0), Sample(0, 1.0, 10.0), Sample(1, 1.5, 80.0, 3, 20.0)])
    assert tel.latest[0].cpu == 50.0  # a late-arriving older sample does not replace a newer one
    assert tel.latest[1].queued == 3


# -- pipeline ------------------------------------------------------------------------------------------

# 1F1B with p = 2, m = 3 on engines 5 (stage 0) and 3 (stage 1), F = 1, B = 2, no communication:
#   engine 5: F0 0-1, F1 1-2, B0 4-6, F2 6-7, B1 7-9, B2 10-12
#   engine 3: F0 1-2, B0 2-4, F1 4-5, B1 5-7, F2 7-8, B2 8-10
HAND = [
    Span(5, "F", 0, 1, "r1", 0, 0), Span(5, "F", 1, 2, "r1", 0, 1), Span(5, "B", 4, 6, "r1", 0, 0),
    Span(5, "F", 6, 7, "r1", 0, 2), Span(5, "B", 7, 9, "r1", 0, 1), Span(5, "B", 10, 12, "r1", 0, 2),
    Span(3, "F", 1, 2, "r1", 1, 0), Span(3, "B", 2, 4, "r1", 1, 0), Span(3, "F", 4, 5, "r1", 1, 1),
    Span(3, "B", 5, 7, "r1", 1, 1), Span(3, "F", 7, 8, "r1", 1, 2), Span(3, "B", 8, 10, "r1", 1, 2),
]


def test_pipeline_view_on_a_hand_made_1f1b():
    other = [Span(5, "F", 100, 101, "other", 0, 0), Span(3, "pmap", 0, 50, "r1")]
    view = pipeline_view(HAND + other, "r1")
    assert view is not None
    assert view.engines == (5, 3)  # rank order: the engine holding stage 0 first
    assert (view.start, view.end, view.makespan, view.p) == (0, 12, 12, 2)
    assert view.gaps == {5: ((2, 4), (9, 10)), 3: ((0, 1), (10, 12))}
    assert [s.kind for s in view.spans[5]] == ["F", "F", "B", "F", "B", "B"]
    # Busy 9 of 12 on each engine: bubble 1 - 18/24 = 1/4, the idle time is the sum of the gaps.
    assert view.bubble == pytest.approx(0.25)
    idle = sum(b - a for g in view.gaps.values() for a, b in g)
    assert idle / (view.p * view.makespan) == pytest.approx(view.bubble)
    # The simulator agrees on these ops and costs, and so does the closed form.
    assert view.bubble == pytest.approx(sched.simulate(sched.build("1f1b", 2, 3)).bubble)
    assert view.bubble == pytest.approx(sched.theoretical_bubble("1f1b", 2, 3))


def test_pipeline_view_of_an_unknown_run_is_none():
    assert pipeline_view(HAND, "nope") is None
    assert Telemetry().run("nope") is None


@pytest.mark.parametrize("name,p,m", [("1f1b", 4, 8), ("gpipe", 3, 5), ("zb-h1", 4, 6)])
def test_measured_bubble_equals_run_result(name, p, m):
    s = sched.build(name, p, m)
    sim = sched.simulate(s)
    rng = random.Random(f"{name}{p}{m}")
    t0 = 1.7e9  # epoch seconds, as the runtime stamps them
    rows = []
    for sp in sim.spans:  # jittered, so the bubble is not a round number
        start = t0 + sp.start * 0.01 + rng.uniform(0, 1e-3)
        rows.append((sp.rank, sp.op.kind, sp.op.stage, sp.op.mb, start,
                     start + (sp.end - sp.start) * 0.01 * rng.uniform(0.8, 1.0)))
    ranks = [7, 2, 9, 4][:p]
    result = RunResult(s, spans=rows)
    spans = pipeline_spans(rows, ranks, "abc")
    assert all(x.engine == ranks[r[0]] for x, r in zip(spans, rows))
    view = pipeline_view(spans, "abc")
    assert view.bubble == result.bubble
    assert view.engines == tuple(ranks)
    tel = Telemetry()
    tel.ingest(spans=spans)
    assert tel.run("abc").bubble == result.bubble


def test_telemetry_keeps_recent_runs_within_budget():
    tel = Telemetry(max_run_spans=10)
    for run in ("a", "b", "c"):
        tel.ingest(spans=[Span(0, "F", i, i + 1, run, 0, i) for i in range(4)])
    assert tel.runs() == ["b", "c"]  # a was dropped whole to make room
    assert tel.run_version("c") == 4 and tel.run_version("a") == 0
    tel.ingest(spans=[Span(0, "F", i, i + 1, "big", 0, i) for i in range(12)])
    assert tel.runs() == ["big"]
    assert len(list(tel.run_spans("big"))) == 10
    assert "big" in tel.truncated
    assert tel.run("big").start == 2  # the oldest two spans went


def test_memory_stays_bounded_with_100k_events():
    """100,000 mixed events keep the aggregate under MEMORY_BOUND (4.9 MB measured); more do not grow it."""
    def batch(n0: int, n: int) -> tuple[list, list, list]:
        tr, sp, sa = [], [], []
        for i in range(n0, n0 + n):
            t = 1.7e9 + i * 1e-3
            e = i % 16
            pick = i % 5
            if pick < 2:
                tr.append(Transfer(e, ("scatter", "gather", "stage")[i % 3], ("out", "in")[i % 2],
                                   "shm", i * 7919 % (1 << 20), t))
            elif pick < 4:
                # Half pipeline ops in runs of 2,000, half %%pmap chunks.
                if i % 2:
                    sp.append(Span(e, "F", t, t + 5e-4, f"run{i // 2000}", e, i))
                else:
                    sp.append(Span(e, "pmap", t, t + 5e-4, f"p{i // 2000}", items=i))
            else:
                sa.append(Sample(e, t, i % 101 / 1.01, i % 7, i % 97 / 0.97, i, 1 << 34))
        return tr, sp, sa

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tel = Telemetry()
        for n0 in range(0, 100_000, 1000):
            tel.ingest(*batch(n0, 1000))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        for n0 in range(100_000, 130_000, 1000):  # past the point where every buffer is full
            tel.ingest(*batch(n0, 1000))
        gc.collect()
        held_2 = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert tel.events == 130_000
    assert held < MEMORY_BOUND, f"{held} bytes held after 100,000 events"
    assert held_2 < held * 1.1, f"grew from {held} to {held_2} bytes"
    assert len(tel.spans) == 10_000 and len(tel.samples) == 2_000


# -- trace ---------------------------------------------------------------------------------------------


def test_chrome_trace_events_and_round_trip(tmp_path):
    spans = HAND + [Span(3, "pmap", 20.0, 21.0, "p1", items=12), Span(3, "pmap", 20.5, 21.5, "p1", items=1)]
    transfers = [Transfer(5, "scatter", "out", "shm", 100, 0.5),
                 Transfer(5, "stage", "out", "direct", 50, 1.0)]
    samples = [Sample(3, 2.0, 99.0, 2, 40.0, 1000, 2000)]
    t = trace.chrome_trace(spans, transfers, samples)
    assert json.loads(json.dumps(t)) == t
    events = t["traceEvents"]
    xs = [e for e in events if e["ph"] == "X"]
    assert len(xs) == len(spans)
    for e in xs:
        assert {"ph", "ts", "dur", "pid", "tid", "name", "args"} <= set(e)
    first = next(e for e in xs if e["name"] == "B s0 mb0")
    assert (first["ts"], first["dur"]) == (4e6, 2e6)  # microseconds from the earliest record
    assert first["args"] == {"run": "r1", "stage": 0, "microbatch": 0}
    # The two overlapping pmap chunks sit on different threads of engine 3.
    chunks = [e for e in xs if e["cat"] == "pmap"]
    assert {e["name"] for e in chunks} == {"pmap 12 items", "pmap 1 item"}
    assert len({e["tid"] for e in chunks}) == 2
    names = {(e["pid"], e["tid"], e["name"]): e["args"]["name"] for e in events if e["ph"] == "M"
             and e["name"] in ("process_name", "thread_name")}
    pid3 = chunks[0]["pid"]
    assert names[(pid3, 0, "process_name")] == "engine 3"
    assert names[(pid3, 1, "thread_name")] == "engine 3 lane 1"
    counters = [e for e in events if e["ph"] == "C"]
    assert [c["args"] for c in counters if c["name"] == "bytes"] == [
        {"out": 100, "in": 0, "stage": 0}, {"out": 100, "in": 0, "stage": 50}]
    assert any(c["name"] == "load" and c["args"]["gpu %"] == 40.0 for c in counters)

    path = trace.save(tmp_path / "t.json", spans, transfers, samples)
    with open(path) as f:
        assert json.load(f) == t


def test_chrome_trace_of_nothing():
    t = trace.chrome_trace([])
    assert t["traceEvents"] == []
    assert json.loads(json.dumps(t)) == t
