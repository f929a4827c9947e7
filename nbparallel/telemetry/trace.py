"""Telemetry as a Chrome trace (the JSON "Trace Event Format"), which Perfetto and chrome://tracing open.

Each engine is a process named "engine N"; its spans are complete events (``ph: "X"``) on a
thread, with a second thread ("lane") only where spans on that engine overlap, because complete
events on one thread must nest. Bytes moved and load samples become counter tracks (``ph: "C"``).
Times are microseconds since the earliest record; ``otherData.t0`` keeps that origin in epoch
seconds. In a notebook::

    from nbparallel.telemetry import trace
    trace.save("run.json", spans, pool.transfers.since(0)[0])
    # open https://ui.perfetto.dev and drop run.json on it
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from .reduce import flow
from .records import Sample, Span, Transfer

__all__ = ["chrome_trace", "save", "span_name"]


def span_name(s: Span) -> str:
    """A short label: ``F s1 mb3`` for a pipeline op, ``pmap 12 items`` for a chunk, else the kind."""
    if s.stage >= 0 or s.microbatch >= 0:
        return " ".join([s.kind] + ([f"s{s.stage}"] if s.stage >= 0 else [])
                        + ([f"mb{s.microbatch}"] if s.microbatch >= 0 else []))
    if s.items:
        return f"{s.kind} {s.items} item{'s' if s.items != 1 else ''}"
    return s.kind


def chrome_trace(spans: Iterable[Span], transfers: Iterable[Transfer] = (),
                 samples: Iterable[Sample] = ()) -> dict[str, Any]:
    """The trace as a dict ready for :func:`json.dumps`: ``{"traceEvents": [...], ...}``.

    >>> t = chrome_trace([Span(0, "F", 10.0, 10.5, "ab", 0, 3)])
    >>> [e for e in t["traceEvents"] if e["ph"] == "X"]  # doctest: +NORMALIZE_WHITESPACE
    [{'ph': 'X', 'name': 'F s0 mb3', 'cat': 'F', 'pid': 1, 'tid': 0, 'ts': 0.0, 'dur': 500000.0,
      'args': {'run': 'ab', 'stage': 0, 'microbatch': 3}}]
    """
    spans, transfers, samples = list(spans), list(transfers), list(samples)
    times = ([s.start for s in spans] + [t.time for t in transfers] + [x.time for x in samples])
    t0 = min(times, default=0.0)

    def us(t: float) -> float:
        return round((t - t0) * 1e6, 3)

    events: list[dict[str, Any]] = []
    lanes: dict[int, int] = {}  # engine -> number of lanes used
    for engine, rows in _lanes(spans).items():
        lanes[engine] = len(rows)
        for tid, row in enumerate(rows):
            for s in row:
                args: dict[str, Any] = {"run": s.run} if s.run else {}
                if s.stage >= 0:
                    args["stage"] = s.stage
                if s.microbatch >= 0:
                    args["microbatch"] = s.microbatch
                if s.items:
                    args["items"] = s.items
                events.append({"ph": "X", "name": span_name(s), "cat": s.kind, "pid": _pid(engine),
                               "tid": tid, "ts": us(s.start), "dur": round((s.end - s.start) * 1e6, 3),
                               "args": args})

    # Cumulative bytes per engine and flow: a counter track that only goes up, easy to read rates from.
    moved: dict[int, dict[str, int]] = {}
    for t in sorted(transfers, key=lambda t: t.time):
        per = moved.setdefault(t.engine, {"out": 0, "in": 0, "stage": 0})
        per[flow(t.kind, t.direction)] += t.nbytes
        events.append({"ph": "C", "name": "bytes", "pid": _pid(t.engine), "tid": 0, "ts": us(t.time),
                       "args": dict(per)})
    for x in sorted(samples, key=lambda x: x.time):
        load: dict[str, float] = {"cpu %": x.cpu, "queued": x.queued}
        if x.gpu_util is not None:
            load["gpu %"] = x.gpu_util
        events.append({"ph": "C", "name": "load", "pid": _pid(x.engine), "tid": 0, "ts": us(x.time),
                       "args": load})
        if x.gpu_mem is not None:
            events.append({"ph": "C", "name": "gpu memory", "pid": _pid(x.engine), "tid": 0,
                           "ts": us(x.time), "args": {"bytes": x.gpu_mem}})

    engines = sorted(set(lanes) | set(moved) | {x.engine for x in samples})
    meta: list[dict[str, Any]] = []
    for e in engines:
        pid = _pid(e)
        meta.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                     "args": {"name": f"engine {e}"}})
        meta.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                     "args": {"sort_index": e}})
        for tid in range(max(1, lanes.get(e, 0))):
            name = f"engine {e}" if tid == 0 else f"engine {e} lane {tid}"
            meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
    return {"traceEvents": meta + events, "displayTimeUnit": "ms",
            "otherData": {"source": "nbparallel", "t0": t0}}


def save(path: str | os.PathLike[str], spans: Iterable[Span], transfers: Iterable[Transfer] = (),
         samples: Iterable[Sample] = ()) -> str:
    """Write :func:`chrome_trace` as JSON to ``path``; returns the path as a string.

    >>> trace.save("pipeline.json", spans)            # doctest: +SKIP
    'pipeline.json'
    """
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(spans, transfers, samples), f)
    return path


def _pid(engine: int) -> int:
    # pid 0 reads as the idle process in some trace viewers; names come from the metadata anyway.
    return engine + 1


def _lanes(spans: list[Span]) -> dict[int, list[list[Span]]]:
    """Per engine, spans in rows where none overlap: each goes to the first row free at its start."""
    out: dict[int, list[list[Span]]] = {}
    for s in sorted(spans, key=lambda s: (s.engine, s.start, -s.end)):
        rows = out.setdefault(s.engine, [])
        for row in rows:
            if row[-1].end <= s.start:
                row.append(s)
                break
        else:
            rows.append([s])
    return out
