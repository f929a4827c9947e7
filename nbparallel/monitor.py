"""What the pool's engines did, recorded as it happens, and the dashboards that show it.

Every magic waits inside ``session.monitor.watch(...)``. The pool's wait loop calls :meth:`Watch.tick`
a few times a second, which pulls what long tasks published (``engine/live.py``), samples the
CPU of engines on this host, and feeds every open dashboard only the records that are new. A
magic that runs longer than :data:`SHOW_AFTER` seconds gets a dashboard under its cell, unless
``--no-dashboard`` or ``nbparallel.config.dashboard = False`` says otherwise; ``%nbp monitor``
opens one that follows every magic until the pool stops.

Records are kept on the notebook's clock: an engine on another host has its offset estimated
once (the midpoint of the fastest of three round trips) and subtracted from its times.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from . import config
from .telemetry.records import Ring, Sample, Span, Transfer, transfer
from .widgets.progress import _in_kernel

__all__ = ["Monitor", "Watch", "SHOW_AFTER"]

SHOW_AFTER = 0.5  # seconds: a quick cell stays clean, a long one shows what it is doing
TICK = 0.2  # seconds between looks, so a tight waiting loop costs nothing
SAMPLE_EVERY = 0.5  # seconds between CPU samples of the local engines
SPANS_KEPT = 100_000
SAMPLES_KEPT = 10_000


@dataclass
class _Followed:
    """A pipeline rank's task whose published spans are being read as they arrive."""

    engine: int
    run: str
    stage_engines: dict[int, int] = field(default_factory=dict)
    seen_keys: set[str] = field(default_factory=set)
    spans: int = 0
    sent: dict[str, int] = field(default_factory=dict)


class Monitor:
    """The telemetry of one pool: rings of spans and samples (transfers live in the data plane).

    ``pool`` is the connection it reads engine facts through; ``transfers`` the data plane's ring.

    >>> mon = nbparallel.current().monitor
    >>> [s for s in mon.spans.since(0)[0] if s.kind == "pmap"][:2]
    """

    def __init__(self, pool: Any, transfers: Ring[Transfer]):
        self.pool = pool
        self._transfers = transfers
        self.spans: Ring[Span] = Ring(SPANS_KEPT)
        self.samples: Ring[Sample] = Ring(SAMPLES_KEPT)
        self._offsets: dict[int, float] = {}
        self._procs: dict[int, Any] = {}
        self._sampled = 0.0
        self._boards: list[tuple[Any, list[int]]] = []  # (dashboard, cursors into the three rings)
        self._pipelines: dict[str, tuple[str, float | None, dict[int, int]]] = {}
        self._queued: dict[int, int] = {}

    @property
    def transfers(self) -> Ring[Transfer]:
        return self._transfers

    # -- recording -----------------------------------------------------------------------------
    def offset(self, engine: int) -> float:
        """Seconds the engine's clock is ahead of this one (0 on this host: one clock)."""
        if engine not in self._offsets:
            host = self.pool.info(engine).get("host")
            self._offsets[engine] = 0.0 if host == socket.gethostname() else self._measure(engine)
        return self._offsets[engine]

    def _measure(self, engine: int) -> float:
        best = (float("inf"), 0.0)
        for _ in range(3):
            t0 = time.time()
            remote = self.pool.call(engine, time.time, timeout=10, what="its clock")
            t1 = time.time()
            best = min(best, (t1 - t0, remote - (t0 + t1) / 2))
        return best[1]

    def span(self, engine: int, kind: str, start: float, end: float, **fields: Any) -> None:
        """Record work timed on ``engine``'s clock."""
        if not config.telemetry:
            return
        off = self.offset(engine)
        self.spans.append(Span(engine, kind, start - off, end - off, **fields))

    def pipeline(self, run: str, schedule: str, theory: float | None,
                 peak_stash: dict[int, int], labels: dict[int, str] | None = None) -> None:
        """What a finished pipeline run's measured bubble is compared with on the dashboards;
        ``labels``: each engine's place in the run's layout, for its timeline row."""
        self._pipelines[run] = (schedule, theory, dict(peak_stash), dict(labels or {}))
        for board, _ in self._boards:
            board.pipeline(run, schedule, theory, peak_stash, labels)

    def sample(self, force: bool = False) -> None:
        """CPU % of each engine process on this host, at most every :data:`SAMPLE_EVERY` s.

        An engine bound to a GPU also gets its device's utilisation and memory from NVML, found
        by UUID (``pool.gpu_metrics``, handles cached); without NVML those fields stay None.
        """
        now = time.time()
        if not force and now - self._sampled < SAMPLE_EVERY:
            return
        self._sampled = now
        import psutil

        for eid in self.pool.ids:
            proc = self._procs.get(eid)
            if proc is None:
                info = self.pool.info(eid)
                if info.get("host") != socket.gethostname() or info.get("pid", -1) < 0:
                    continue  # another host's processes are not ours to read
                try:
                    proc = self._procs[eid] = psutil.Process(info["pid"])
                    proc.cpu_percent(None)  # the first reading only starts the interval
                except psutil.Error:
                    continue
                continue
            try:
                cpu = proc.cpu_percent(None)
            except psutil.Error:
                self._procs.pop(eid, None)
                continue
            util, used, total = self.pool.gpu_metrics(eid)
            self.samples.append(Sample(eid, now, cpu, self._queued.get(eid, 0), util, used, total))

    # -- dashboards ----------------------------------------------------------------------------
    def open(self, engines: Sequence[int] | None = None, history: bool = True,
             side: bool = False) -> Any:
        """A dashboard fed from now on by every magic (``%nbp monitor``); shows what is kept so
        far. ``side`` puts it in a JupyterLab side panel (``%nbp monitor --side``)."""
        from .widgets.dashboard import Dashboard

        board = Dashboard(list(engines or self.pool.ids), title="nbparallel monitor")
        self._attach(board, history)
        board.show(side=side)
        self.refresh()
        return board

    def _attach(self, board: Any, history: bool) -> None:
        rings = (self.transfers, self.spans, self.samples)
        cursors = [0 if history else r.cursor for r in rings]
        for run, info in self._pipelines.items():
            board.pipeline(run, *info)
        self._boards.append((board, cursors))

    def _detach(self, board: Any) -> None:
        self._boards = [(b, c) for b, c in self._boards if b is not board]

    def refresh(self, force: bool = False) -> None:
        """Feed each dashboard what is new since it last looked, and let it redraw if due."""
        rings = (self.transfers, self.spans, self.samples)
        for board, cursors in self._boards:
            news = []
            for k, ring in enumerate(rings):
                new, cursors[k] = ring.since(cursors[k])
                news.append(new)
            board.feed(transfers=news[0], spans=news[1], samples=news[2])
            board.tick(force)

    def close(self) -> None:
        """The pool stopped: leave each open dashboard's last state in place."""
        for board, _ in self._boards:
            board.finish()
        self._boards = []

    # -- magics --------------------------------------------------------------------------------
    def watch(self, label: str, engines: Sequence[int], show: bool | None = None) -> "Watch":
        """The telemetry side of one magic run; ``show`` None means the configured default."""
        show = config.dashboard if show is None else show
        return Watch(self, label, list(engines), show and config.telemetry, config.telemetry)


class Watch:
    """One magic run: ticks while it waits, follows pipeline tasks, shows its own dashboard."""

    def __init__(self, monitor: Monitor, label: str, engines: list[int], show: bool,
                 enabled: bool = True):
        self.monitor = monitor
        self.enabled = enabled
        self.label = label
        self.engines = engines
        self.show = show and _in_kernel()
        self.t0 = time.monotonic()
        self.wall0 = time.time()  # samples are stamped with the wall clock
        self.last = 0.0
        self.board: Any = None
        self._cursors = [r.cursor for r in (monitor.transfers, monitor.spans, monitor.samples)]
        self._followed: dict[Any, _Followed] = {}

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.monitor._queued = {}  # before the last sample: nothing is queued any more
        # A last sample only to replace one taken while this ran (engines shown queued): a
        # run of a few ms would pay a /proc read per engine for a CPU share of nothing.
        self.tick(force=True, sample=self.monitor._sampled >= self.wall0)
        if self.board is not None:
            self.board.finish()
            self.monitor._detach(self.board)

    def queued(self, counts: dict[int, int]) -> None:
        """Tasks in flight per engine, shown as each engine's queue."""
        self.monitor._queued = counts

    def follow(self, future: Any, engine: int, run: str, stage_engines: dict[int, int]) -> None:
        """Read a pipeline rank's published spans while it runs; ``stage_engines`` maps each
        stage to its engine, for the receiving end of the bytes it sends."""
        self._followed[future] = _Followed(engine, run, dict(stage_engines))

    def tick(self, force: bool = False, sample: bool | None = None) -> None:
        """Pull, sample and redraw, at most every :data:`TICK` seconds unless ``force``;
        ``sample`` forces (or skips forcing) the CPU sample alone."""
        now = time.monotonic()
        if not self.enabled or not force and now - self.last < TICK:
            return
        self.last = now
        for fut, f in self._followed.items():
            batches = {k: v for k, v in self.monitor.pool.published(fut).items()
                       if k.startswith("nbp") and k[3:].isdigit()}
            for key in sorted(batches, key=lambda k: int(k[3:])):
                batch = batches[key]
                if key not in f.seen_keys:
                    f.seen_keys.add(key)
                    self._ingest(f, batch["spans"], batch["k"], batch.get("sent", {}))
        self.monitor.sample(force if sample is None else sample)
        if self.board is None and self.show and now - self.t0 >= SHOW_AFTER:
            from .widgets.dashboard import Dashboard

            self.board = Dashboard(self.engines, title=self.label)
            self.monitor._boards.append((self.board, list(self._cursors)))
            for run, info in self.monitor._pipelines.items():
                self.board.pipeline(run, *info)
            self.board.show()
        self.monitor.refresh(force)

    def settle(self, future: Any, spans: list[Any], sent: dict[str, int]) -> None:
        """A followed task's reply: record whatever of it was not published while it ran."""
        f = self._followed[future]
        if not self.enabled:  # stage bytes are transfers: counted even without telemetry
            spans = []
        self._ingest(f, spans[f.spans:], f.spans, sent)

    def _ingest(self, f: _Followed, spans: Iterable[Any], k: int, sent: dict[str, int]) -> None:
        spans = list(spans)
        if k > f.spans:
            return  # a batch published after a reply was settled: already recorded
        spans = spans[f.spans - k:]
        for kind, stage, mb, t0, t1 in spans:
            self.monitor.span(f.engine, kind, t0, t1, run=f.run, stage=stage, microbatch=mb)
        f.spans += len(spans)
        for key, total in sent.items():
            delta = total - f.sent.get(key, 0)
            if delta > 0:
                how, _, stage = key.partition(">")  # "<transport>><receiving stage>"
                peer = f.stage_engines.get(int(stage), -1) if stage.isdigit() else -1
                self.monitor.transfers.append(transfer(f.engine, "stage", "out", how, delta, peer))
                f.sent[key] = total

