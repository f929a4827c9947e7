"""Pure reducers over telemetry records: load, bytes moved, pipeline bubbles; and a bounded aggregate.

Every function takes plain records (:class:`~nbparallel.telemetry.records.Transfer`,
:class:`~nbparallel.telemetry.records.Span`, :class:`~nbparallel.telemetry.records.Sample`) and an
explicit ``now`` where time matters, so tests feed synthetic records and a fixed clock. Renderers
(the dashboard, a terminal, a trace file) read the results; nothing here draws or talks to engines::

    from nbparallel.telemetry.reduce import Telemetry
    tel = Telemetry(engines=[0, 1])
    tel.ingest(transfers=new_transfers, spans=new_spans, samples=new_samples)
    tel.busy(now=time.time())           # {0: 0.83, 1: 0.41}: share of the last 5 s each engine worked
    tel.totals()                        # {'out': ..., 'in': ..., 'stage': ..., 'all': ...} bytes
    tel.pairs                           # {(0, 1): ...}: bytes engine 0 sent engine 1 (comm, stages)
    tel.comm_seconds                    # {0: 0.12, 1: 0.31}: time each engine spent in collectives
    tel.run(run_id).bubble              # measured idle share of a pipeline run
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..pipeline.schedule import bubble
from .history import History
from .records import Sample, Span, Transfer

__all__ = [
    "PIPELINE_KINDS", "FLOWS", "PEER_KINDS", "union", "busy_fraction", "flow", "bytes_by_engine",
    "totals", "comm_matrix", "gbps", "PipelineView", "pipeline_view", "pipeline_spans", "Telemetry", "MEMORY_BOUND",
]

#: Span kinds that belong to a pipeline run (one op of a schedule, or the optimiser step).
PIPELINE_KINDS = ("F", "B", "I", "W", "step")
#: Where bytes went: ``out`` notebook to engine, ``in`` engine to notebook, ``stage`` engine to engine.
FLOWS = ("out", "in", "stage")
#: Transfer kinds that go engine to engine (``engine`` sent, ``peer`` received): pipeline
#: activations and gradients, and ``comm`` collectives.
PEER_KINDS = ("stage", "comm")

#: Bytes the :class:`Telemetry` aggregate may hold with its default limits, whatever it is fed
#: (checked with tracemalloc after 100,000 events in tests/test_telemetry.py). About 250 bytes per
#: held Span or Sample: 10,000 recent spans + 10,000 pipeline spans + 2,000 samples ~ 5.5 MB.
MEMORY_BOUND = 8 * 2**20


# ----------------------------------------------------------------------------------------------------
# Load


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The disjoint, sorted union of ``(start, end)`` intervals; empty ones are dropped.

    >>> union([(0, 2), (1, 3), (5, 6), (4, 4)])
    [(0, 3), (5, 6)]
    """
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv for iv in intervals if iv[1] > iv[0]):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def busy_fraction(spans: Iterable[Span], now: float, window: float = 5.0) -> dict[int, float]:
    """Per engine, the share of ``(now - window, now]`` covered by its spans.

    Spans are clipped to the window, and overlapping spans on one engine count once (a %%pmap
    chunk and a pipeline op at the same moment are still one busy engine). Engines without a span
    in the window are absent; callers add zeros for the engines they know.

    >>> busy_fraction([Span(0, "pmap", 1.0, 3.0), Span(0, "pmap", 2.0, 4.0)], now=5.0, window=5.0)
    {0: 0.6}
    """
    lo = now - window
    clipped: dict[int, list[tuple[float, float]]] = {}
    for s in spans:
        a, b = max(s.start, lo), min(s.end, now)
        if b > a:
            clipped.setdefault(s.engine, []).append((a, b))
    return {e: sum(b - a for a, b in union(ivs)) / window for e, ivs in sorted(clipped.items())}


# ----------------------------------------------------------------------------------------------------
# Bytes


def flow(kind: str, direction: str) -> str:
    """Which of :data:`FLOWS` a transfer counts under: the :data:`PEER_KINDS` are engine to engine
    whatever their direction; otherwise ``out`` (notebook to engine) or ``in`` (engine to notebook)."""
    return "stage" if kind in PEER_KINDS else ("in" if direction == "in" else "out")


def bytes_by_engine(transfers: Iterable[Transfer]) -> dict[int, dict[tuple[str, str], int]]:
    """Bytes per engine per ``(kind, direction)``.

    >>> bytes_by_engine([Transfer(0, "scatter", "out", "shm", 10, 0.0),
    ...                  Transfer(0, "scatter", "out", "shm", 5, 1.0)])
    {0: {('scatter', 'out'): 15}}
    """
    out: dict[int, dict[tuple[str, str], int]] = {}
    for t in transfers:
        per = out.setdefault(t.engine, {})
        per[(t.kind, t.direction)] = per.get((t.kind, t.direction), 0) + t.nbytes
    return out


def totals(by_engine: dict[int, dict[tuple[str, str], int]]) -> dict[str, int]:
    """Bytes per flow (``out``, ``in``, ``stage``) and ``all``, from :func:`bytes_by_engine`."""
    out = dict.fromkeys(FLOWS, 0)
    for per in by_engine.values():
        for (kind, direction), n in per.items():
            out[flow(kind, direction)] += n
    out["all"] = sum(out[f] for f in FLOWS)
    return out


def comm_matrix(transfers: Iterable[Transfer]) -> dict[tuple[int, int], int]:
    """Bytes from engine to engine, ``(sender, receiver) -> bytes``, over the :data:`PEER_KINDS`.

    >>> comm_matrix([Transfer(0, "comm", "out", "shm", 8, 0.0, peer=1),
    ...              Transfer(1, "comm", "out", "shm", 8, 0.0, peer=0),
    ...              Transfer(0, "comm", "out", "shm", 8, 1.0, peer=1),
    ...              Transfer(0, "scatter", "out", "shm", 99, 1.0)])
    {(0, 1): 16, (1, 0): 8}
    """
    out: dict[tuple[int, int], int] = {}
    for t in transfers:
        if t.kind in PEER_KINDS and t.peer >= 0:
            out[t.engine, t.peer] = out.get((t.engine, t.peer), 0) + t.nbytes
    return out


def gbps(transfers: Iterable[Transfer], now: float, window: float = 1.0) -> float:
    """Gigabytes (1e9 bytes) per second moved in ``(now - window, now]``, all flows together."""
    return sum(t.nbytes for t in transfers if now - window < t.time <= now) / window / 1e9


# ----------------------------------------------------------------------------------------------------
# Pipeline


@dataclass(frozen=True)
class PipelineView:
    """One pipeline run, ready to draw: rows are engines in rank order (the engine holding stage 0
    first). ``gaps[e]`` are engine ``e``'s idle intervals between the run's first op start
    (``start``) and last op end (``end``): the bubbles. ``bubble`` is the idle share of
    ``p * (end - start)``, by :func:`nbparallel.pipeline.schedule.bubble` (as :attr:`nbparallel.pipeline.runtime.RunResult.bubble`)."""

    run: str
    start: float
    end: float
    engines: tuple[int, ...]
    spans: dict[int, tuple[Span, ...]]
    gaps: dict[int, tuple[tuple[float, float], ...]]
    bubble: float
    p: int

    @property
    def makespan(self) -> float:
        return self.end - self.start


def pipeline_view(spans: Iterable[Span], run: str, p: int | None = None) -> PipelineView | None:
    """The :class:`PipelineView` of run ``run`` from ``spans`` (others are ignored); None if it has none.

    ``p`` is the number of ranks (default: the engines that have a span in the run).

    >>> v = pipeline_view([Span(0, "F", 0, 1, "r", 0, 0), Span(1, "F", 1, 2, "r", 1, 0)], "r")
    >>> v.bubble, v.gaps
    (0.5, {0: ((1, 2),), 1: ((0, 1),)})
    """
    mine = [s for s in spans if s.run == run and s.kind in PIPELINE_KINDS]
    if not mine:
        return None
    t0 = min(s.start for s in mine)
    t1 = max(s.end for s in mine)
    first_stage: dict[int, float] = {}
    for s in mine:
        stage = s.stage if s.stage >= 0 else math.inf  # a step span says nothing about placement
        first_stage[s.engine] = min(first_stage.get(s.engine, math.inf), stage)
    engines = tuple(sorted(first_stage, key=lambda e: (first_stage[e], e)))
    rows = {e: tuple(sorted((s for s in mine if s.engine == e), key=lambda s: (s.start, s.end)))
            for e in engines}
    gaps = {e: _gaps(union((s.start, s.end) for s in rows[e]), t0, t1) for e in engines}
    p = len(engines) if p is None else p
    # Summed in input order like RunResult.bubble so both give the same float; ops on one engine
    # run one after another, so the sum equals the union the gaps are drawn from.
    return PipelineView(run, t0, t1, engines, rows, gaps, bubble(((s.start, s.end) for s in mine), p), p)


def _gaps(busy: list[tuple[float, float]], t0: float, t1: float) -> tuple[tuple[float, float], ...]:
    out, at = [], t0
    for a, b in busy:
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if t1 > at:
        out.append((at, t1))
    return tuple(out)


def pipeline_spans(rows: Iterable[tuple[int, str, int, int, float, float]], ranks: list[int],
                   run: str) -> list[Span]:
    """Span records from :attr:`RunResult.spans` rows ``(rank, kind, stage, mb, start, end)``;
    ``ranks[r]`` is the engine id of rank ``r``.

    >>> pipeline_spans([(1, "F", 1, 0, 2.0, 3.0)], ranks=[4, 7], run="ab12")
    [Span(engine=7, kind='F', start=2.0, end=3.0, run='ab12', stage=1, microbatch=0, items=0)]
    """
    return [Span(ranks[r], kind, start, end, run, stage, mb) for r, kind, stage, mb, start, end in rows]


# ----------------------------------------------------------------------------------------------------
# The bounded aggregate


class Telemetry:
    """Running state fed with batches of new records; its memory stays bounded however long it runs.

    Held: byte totals per ``(engine, kind, direction)`` (a few hundred integers), bytes per
    ``bucket``-second time bucket over the last ``horizon`` seconds (for GB/s), the last
    ``max_spans`` spans (for busy fractions), the spans of recent pipeline runs up to
    ``max_run_spans`` in all (the oldest run is dropped first), the last ``max_samples`` samples
    and the latest sample per engine. With the defaults that stays under :data:`MEMORY_BOUND`.
    A pipeline run longer than ``max_run_spans`` keeps only its newest spans (``truncated`` lists it).

    In a notebook, fed from the pool's rings with cursors::

        from nbparallel.format import nbytes
        tel = Telemetry(engines=pool.ids)
        new, cur = pool.transfers.since(cur)
        tel.ingest(transfers=new)
        f"{nbytes(tel.totals()['all'])} moved, {tel.gbps(time.time()):.2f} GB/s now"
    """

    def __init__(self, engines: Iterable[int] = (), *, max_spans: int = 10_000,
                 max_samples: int = 2_000, max_run_spans: int = 10_000, horizon: float = 10.0,
                 bucket: float = 0.05):
        self.engines: set[int] = set(engines)
        self.events = 0
        self.total_bytes = 0
        self.bytes: dict[tuple[int, str, str], int] = {}
        #: Bytes from engine to engine since the start (:func:`comm_matrix`).
        self.pairs: dict[tuple[int, int], int] = {}
        #: Seconds each engine spent in ``comm`` collectives since the start.
        self.comm_seconds: dict[int, float] = {}
        self.spans: deque[Span] = deque(maxlen=max_spans)
        self.samples: deque[Sample] = deque(maxlen=max_samples)
        self.latest: dict[int, Sample] = {}
        self.truncated: set[str] = set()
        self._runs: OrderedDict[str, deque[Span]] = OrderedDict()
        self._added: dict[str, int] = {}  # spans ever added per held run: a version to cache views on
        self._run_spans = 0
        self._max_run_spans = max_run_spans
        self._horizon, self._bucket = horizon, bucket
        self._buckets: dict[int, int] = {}
        self._newest = -math.inf
        #: The last minutes in one-second bins, for the charts over time.
        self.history = History()

    def ingest(self, transfers: Iterable[Transfer] = (), spans: Iterable[Span] = (),
               samples: Iterable[Sample] = ()) -> bool:
        """Add new records; returns whether there were any."""
        before = self.events
        for t in transfers:
            self._transfer(t)
        for s in spans:
            self._span(s)
        for x in samples:
            self.engines.add(x.engine)
            self.samples.append(x)
            last = self.latest.get(x.engine)
            if last is None or x.time >= last.time:
                self.latest[x.engine] = x
            self.history.add_sample(x.engine, x.time, x.cpu, x.gpu_util)
            self.events += 1
        self._prune()
        return self.events > before

    def _transfer(self, t: Transfer) -> None:
        self.engines.add(t.engine)
        key = (t.engine, t.kind, t.direction)
        self.bytes[key] = self.bytes.get(key, 0) + t.nbytes
        if t.kind in PEER_KINDS and t.peer >= 0:
            self.pairs[t.engine, t.peer] = self.pairs.get((t.engine, t.peer), 0) + t.nbytes
        self.total_bytes += t.nbytes
        k = math.floor(t.time / self._bucket)
        self._buckets[k] = self._buckets.get(k, 0) + t.nbytes
        self.history.add_bytes("comm" if t.kind == "comm" else flow(t.kind, t.direction), t.time,
                               t.nbytes)
        self._newest = max(self._newest, t.time)
        self.events += 1

    def _span(self, s: Span) -> None:
        self.engines.add(s.engine)
        self.spans.append(s)
        self.events += 1
        self.history.add_span(s.engine, s.kind, s.start, s.end)
        if s.kind == "comm":
            self.comm_seconds[s.engine] = self.comm_seconds.get(s.engine, 0.0) + s.end - s.start
        if s.kind not in PIPELINE_KINDS or not s.run:
            return
        held = self._runs.get(s.run)
        if held is None:
            held = self._runs[s.run] = deque()
        held.append(s)
        self._added[s.run] = self._added.get(s.run, 0) + 1
        self._run_spans += 1
        # Drop whole old runs first; only a run bigger than the budget loses its own oldest spans.
        while self._run_spans > self._max_run_spans:
            oldest = next(iter(self._runs))
            if oldest == s.run:
                held.popleft()
                self._run_spans -= 1
                self.truncated.add(s.run)
            else:
                self._run_spans -= len(self._runs.pop(oldest))
                del self._added[oldest]
                self.truncated.discard(oldest)

    def _prune(self) -> None:
        # Buckets older than the horizon can never be in a rate window again.
        if len(self._buckets) * self._bucket > self._horizon:
            cut = math.floor((self._newest - self._horizon) / self._bucket)
            for k in [k for k in self._buckets if k < cut]:
                del self._buckets[k]

    # -- readers ---------------------------------------------------------------------------------
    def busy(self, now: float, window: float = 5.0) -> dict[int, float]:
        """:func:`busy_fraction` over the held spans, with 0.0 for every known engine without work."""
        out = dict.fromkeys(sorted(self.engines), 0.0)
        out.update(busy_fraction(self.spans, now, window))
        return out

    def by_engine(self) -> dict[int, dict[tuple[str, str], int]]:
        """Bytes per engine per ``(kind, direction)`` since the start (as :func:`bytes_by_engine`)."""
        out: dict[int, dict[tuple[str, str], int]] = {e: {} for e in sorted(self.engines)}
        for (e, kind, direction), n in sorted(self.bytes.items()):
            out.setdefault(e, {})[(kind, direction)] = n
        return out

    def totals(self) -> dict[str, int]:
        """Bytes per flow and ``all`` since the start (as :func:`totals`)."""
        return totals(self.by_engine())

    def gbps(self, now: float, window: float = 1.0) -> float:
        """GB/s over ``(now - window, now]``, to ``bucket`` seconds' resolution; ``window`` should not
        exceed ``horizon``."""
        lo = math.floor((now - window) / self._bucket + 1e-9)
        hi = math.floor(now / self._bucket)
        return sum(n for k, n in self._buckets.items() if lo < k <= hi) / window / 1e9

    def runs(self) -> list[str]:
        """Pipeline run ids held, oldest first."""
        return list(self._runs)

    def run_spans(self, run: str) -> Iterator[Span]:
        """The held spans of pipeline run ``run``, in arrival order."""
        return iter(self._runs.get(run, ()))

    def run_version(self, run: str) -> int:
        """How many spans run ``run`` has received (0 if not held): changes whenever its view does."""
        return self._added.get(run, 0)

    def run(self, run: str, p: int | None = None) -> PipelineView | None:
        """The :class:`PipelineView` of a held pipeline run, or None."""
        return pipeline_view(self._runs.get(run, ()), run, p)
