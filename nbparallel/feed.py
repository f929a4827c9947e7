"""The notebook's half of a ``%%pmap``: chunks offered to one puller task per engine.

A map starts one ipyparallel task per engine (``engine/feed.py``); from then on chunks and
results travel over the notebook's own signed channel server, never through the controller or
its scheduler. Each engine has up to :data:`WINDOW` chunks offered ahead (and fetches the next
before it runs one), so it starts its next chunk the moment it sends a result; an engine with
nothing left to do takes back the last chunk offered to a busier one that has not fetched it
yet, so an engine still busy with another client's work is worked around.

Engine death: a dead engine's chunks that it never fetched go to the others; those it fetched
(the one it ran, the next) are re-run elsewhere up to ``retries`` times, else their items fail
as ``EngineDied``. Ctrl-C interrupts every engine and leaves nothing offered behind.
"""

from __future__ import annotations

import os
import pickle
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import cloudpickle

from .dataplane import transport
from .engine.feed import CHUNK, STOP, run_pmap_feed
from .errors import ControllerLost, PoolError, RemoteFailure
from .relay import Relay
from .telemetry.records import transfer
from .widgets.progress import progress

__all__ = ["Feed", "WINDOW"]

WINDOW = 2  # chunks offered per engine: the one it runs and the next, so it never waits
LOOK = 0.1  # seconds between looks at engines, the controller, the dashboard and output
FINISH_GRACE = 10.0  # seconds a told-to-stop engine gets to end its task
DEATH_GRACE = 2.0  # seconds for ipyparallel to fail a dead engine's task, for its message


@dataclass
class _Chunk:
    span: range
    note: Any
    size: int
    tries: int = 0


@dataclass
class _Rank:
    """One engine's part of the map: chunks by sequence number, ``low`` the one it runs (or
    will next), ``high`` the next number to offer."""

    engine: int
    prefix: str
    future: Any = None
    chunks: dict[int, _Chunk] = field(default_factory=dict)
    low: int = 0
    high: int = 0
    ran: int = 0
    state: str = "working"  # then "stopped" (told to stop) or "gone" (died or failed)

    @property
    def busy(self) -> bool:
        return self.high > self.low


class Feed:
    """One map's chunks, offered and collected (``run`` returns results and failures)."""

    def __init__(self, session: Any, spec: Any, cell: Any, names_blob: bytes, items: Sequence[Any],
                 ids: list[int], chunker: Any, watch: Any):
        self.session, self.spec, self.items, self.chunker, self.watch = (
            session, spec, items, chunker, watch)
        self.pool, self.plane = session.pool, session.plane
        self.server = self.plane.server()
        self.cell, self.names_blob = cell, names_blob
        mid = secrets.token_hex(6)
        self.ranks = {e: _Rank(e, f"pmap/{mid}/{e}/") for e in ids}
        self.retry: list[_Chunk] = []
        self.results: list[Any] = [None] * len(items)
        self.arrival: list[Any] = []
        self.failures: list[RemoteFailure] = []
        self.done = 0
        self.relay = Relay()
        self.last_why: RemoteFailure | None = None

    # -- the map -------------------------------------------------------------------------------
    def run(self) -> tuple[list[Any], list[Any], list[RemoteFailure]]:
        self.plane.sweep_feeds()
        bar = progress(len(self.items), "%%pmap", self.spec.progress)
        try:
            self._fill_all()  # offered before the tasks start: no engine waits for its first
            self._start()
            self._loop(bar)
            self._finish()
        except BaseException as exc:
            # Without a controller no signal can reach the engines (and asking would hang).
            self._abandon(interrupt=not isinstance(exc, ControllerLost))
            raise
        finally:
            bar.close(self.done)
        return self.results, self.arrival, self.failures

    def _start(self) -> None:
        pid = os.getpid()
        for r in self.ranks.values():
            local = self.plane.is_local(r.engine)
            try:
                r.future = self.pool.apply(r.engine, run_pmap_feed, self.cell, self.spec.target,
                                           self.names_blob, self.plane.server_endpoint(r.engine),
                                           r.prefix, pid if local else None)
            except PoolError as exc:  # it stopped after the engines were chosen
                self._lose(r, self.pool.died(r.engine, f" (it stopped before the map: {exc})"))

    def _loop(self, bar: Any) -> None:
        last = 0.0
        while self.done < len(self.items):
            waiting = {f"{r.prefix}{r.low}/r": r for r in self._live() if r.busy}
            if not waiting:
                if not any(r.state == "working" for r in self._live()):
                    self._fail_rest()
                    break
                self._fill_all()
            got = self.server.take_first(list(waiting), timeout=LOOK)
            if got is not None:
                tid, header, buffers = got
                self._arrived(waiting[tid], header, buffers)
                self._fill_all()
            now = time.monotonic()
            if got is None or now - last >= LOOK:
                last = now
                if got is None:
                    self.pool.check_controller()
                self._check_engines()
                self.watch.tick()
                self.relay.tick([r.future for r in self.ranks.values()], list(self.ranks))
                bar.update(self.done)

    def _finish(self) -> None:
        """Tell every engine to stop; wait for the tasks of those whose items printed, to show
        it. The others' replies (milliseconds through the controller) are not waited for."""
        for r in self._live():
            if r.state == "working":
                self._stop(r)
        # One that ran no chunk printed nothing of the map's (it may still be queued behind
        # another client's work, and finds its STOP when it starts).
        ends = {f"{r.prefix}end": r for r in self._live() if r.future is not None and r.ran}
        deadline = time.monotonic() + FINISH_GRACE
        printed = [r for r in self.ranks.values() if r.state == "gone" and r.future is not None]
        while ends:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got = self.server.take_first(list(ends), timeout=min(left, LOOK))
            if got is not None:
                r = ends.pop(got[0])
                if pickle.loads(got[1]):
                    printed.append(r)
            else:
                alive = set(self.pool.alive(list(self.ranks)))
                ends = {tid: r for tid, r in ends.items() if r.engine in alive}
        self.pool.wait([r.future for r in printed], [r.engine for r in printed],
                       timeout=FINISH_GRACE)
        for r in self.ranks.values():
            if r in printed and r.future.done():
                self.pool.relay_output(r.future, r.engine, self.relay)
            elif r.future is not None:
                self.plane.linger(r.prefix, r.future)

    def _abandon(self, interrupt: bool = True) -> None:
        """Ctrl-C or an error: stop every engine and leave nothing offered behind."""
        if interrupt:
            started = [r for r in self.ranks.values() if r.future is not None]
            self.pool.interrupt([r.future for r in started], [r.engine for r in started])
        for r in self.ranks.values():
            for chunk in r.chunks.values():
                self._release(r.engine, chunk, None)
            r.chunks.clear()
            if r.future is not None:
                self.plane.linger(r.prefix, r.future)
            self.server.discard_prefix(r.prefix)
        for chunk in self.retry:
            self._release(-1, chunk, None)
        self.retry.clear()

    # -- chunks out ----------------------------------------------------------------------------
    def _live(self) -> list[_Rank]:
        return [r for r in self.ranks.values() if r.state != "gone"]

    def _fill_all(self) -> None:
        """Top every working engine up to the window, one chunk each in turn (the first
        chunks, one item each while no timing is known, go one to an engine)."""
        working = [r for r in self._live() if r.state == "working"]
        for depth in range(1, WINDOW + 1):
            for r in working:
                if r.high - r.low < depth and (chunk := self._next_chunk()) is not None:
                    self._offer(r, chunk)
        for r in working:
            if not r.busy and not self._steal_for(r) and self._nothing_left():
                self._stop(r)

    def _next_chunk(self) -> _Chunk | None:
        if self.retry:
            return self.retry.pop(0)
        span = self.chunker.next()
        if span is None:
            return None
        part = self.items[span.start:span.stop]  # a list, a range or an array's view
        if isinstance(part, list):
            size = sum(transport.nbytes_of(item) for item in part)
        else:
            size = transport.nbytes_of(part)
        live = [r.engine for r in self._live()]
        note = self.plane.place_chunk(live, (span.start, part), size, self.spec.transport)
        return _Chunk(span, note, size)

    def _offer(self, r: _Rank, chunk: _Chunk) -> None:
        r.chunks[r.high] = chunk
        self.server.offer(f"{r.prefix}{r.high}", CHUNK + cloudpickle.dumps(chunk.note), [])
        r.high += 1

    def _steal_for(self, r: _Rank) -> bool:
        """Give idle ``r`` the last chunk offered to a busier engine that has not taken it
        (only once ``r`` has sent a result: an engine whose task has not started yet, busy with
        other work, would only hold it up)."""
        if not r.ran:
            return False
        for other in sorted(self._live(), key=lambda o: o.low - o.high):
            if other is r or not other.busy:
                continue
            seq = other.high - 1
            if self.server.withdraw(f"{other.prefix}{seq}"):
                other.high = seq
                self._offer(r, other.chunks.pop(seq))
                return True
        return False

    def _nothing_left(self) -> bool:
        """No chunk can come any more for an idle engine: stop it. With retries, engines wait
        until the last chunk is in, since a death may still give them its chunk."""
        if self.retry or not self.chunker.exhausted:
            return False
        busy = [o for o in self._live() if o.busy]
        return not busy or self.spec.retries == 0

    def _stop(self, r: _Rank) -> None:
        self.server.offer(f"{r.prefix}{r.high}", STOP, [])
        r.state = "stopped"

    # -- results in ----------------------------------------------------------------------------
    def _arrived(self, r: _Rank, header: bytes, buffers: list[memoryview]) -> None:
        chunk = r.chunks.pop(r.low)
        r.low += 1
        r.ran += 1
        # Items' own time sizes chunks: the fixed cost of a chunk is small and paid anyway.
        seconds, total, started, held, lost = pickle.loads(header)
        self._release(r.engine, chunk, held, delivered=True)
        if lost is not None:
            self._fail(chunk, replace(lost, engine=r.engine))
            return
        values, failed = cloudpickle.loads(buffers[0])
        self.plane.transfers.append(transfer(r.engine, "result", "in", transport.DIRECT,
                                             buffers[0].nbytes))
        self.chunker.record(len(values), seconds)
        self.session.monitor.span(r.engine, "pmap", started, started + total, items=len(values))
        start = chunk.span.start
        self.results[start:start + len(values)] = values
        if failed:
            self.arrival.extend(v for k, v in enumerate(values, start) if k not in failed)
            self.failures.extend(replace(f, engine=r.engine) for f in failed.values())
        else:
            self.arrival.extend(values)
        self.done += len(values)

    def _release(self, engine: int, chunk: _Chunk, held: Any, delivered: bool = False) -> None:
        self.plane.chunk_done(engine, chunk.note, chunk.size, held, account=False)
        if delivered:  # items in the message went over this channel, not ipyparallel's
            carrier = (transport.DIRECT if chunk.note.transport == transport.INLINE
                       else chunk.note.transport)
            self.plane.transfers.append(transfer(engine, "payload", "out", carrier, chunk.size))

    def _fail(self, chunk: _Chunk, why: RemoteFailure) -> None:
        self.failures.extend(replace(why, item=i) for i in chunk.span)
        self.chunker.record(len(chunk.span), None)
        self.done += len(chunk.span)

    def _fail_rest(self) -> None:
        """Every engine stopped or failed: the items not run fail as the last one did."""
        lost = self.last_why or RemoteFailure(-1, "EngineDied", "no engine was left to run it",
                                              "EngineDied: no engine was left to run it\n")
        for chunk in self.retry:
            self._release(-1, chunk, None)
            self._fail(chunk, lost)
        self.retry.clear()
        while (span := self.chunker.next()) is not None:
            self._fail(_Chunk(span, None, 0), lost)

    # -- engines that stop -------------------------------------------------------------------
    def _check_engines(self) -> None:
        alive = set(self.pool.alive(list(self.ranks)))
        for r in self._live():
            if r.state == "working" and r.future is not None and r.future.done():
                self._lose(r, self._why(r))
            elif r.engine not in alive:
                self.pool.wait([r.future], [r.engine], timeout=DEATH_GRACE)
                self._lose(r, self._why(r))

    def _why(self, r: _Rank) -> RemoteFailure:
        _, why = self.pool.outcome(r.future, r.engine) if r.future.done() else (None, None)
        if why is None:  # the controller dropped it before ipyparallel failed its task
            why = self.pool.died(r.engine)
        if why.ename == "EngineDied":
            hint = (f"The items it held were retried {self.spec.retries} time(s) and lost each "
                    f"time." if self.spec.retries else
                    "`--retries 1` (retries=1) re-runs the items of an engine that stops on the "
                    "other engines.")
            why = replace(why, traceback=f"{why.traceback.rstrip()} {hint}\n")
        return why

    def _lose(self, r: _Rank, why: RemoteFailure) -> None:
        """``r``'s engine died or its task failed: what it never took goes to the others, what
        it was running is retried or failed."""
        r.state = "gone"
        self.last_why = why
        for seq in sorted(r.chunks):
            # Only the one at r.low can have finished: an engine runs its chunks in order.
            result = self.server.take_first([f"{r.prefix}{seq}/r"])
            if result is not None:
                self._arrived(r, result[1], result[2])
                continue
            chunk = r.chunks.pop(seq)
            if self.server.withdraw(f"{r.prefix}{seq}"):
                self.retry.append(chunk)
            elif chunk.tries < self.spec.retries:
                chunk.tries += 1
                self.retry.append(chunk)
            else:
                self._release(-1, chunk, None)
                self._fail(chunk, why)
        r.low = r.high
        self.server.discard_prefix(r.prefix)
        if why.ename == "EngineDied" and r.engine not in self.pool.alive([r.engine]):
            self.plane.engine_gone(r.engine)  # what it held of our segments is free
        self._fill_all()
