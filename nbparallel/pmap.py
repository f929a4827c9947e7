"""Task parallelism: a load-balanced parallel map whose body is a cell.

The Python twin of ``%%pmap x in range(1000) -> squares``::

    squares = nbparallel.pmap("x * x", "x", range(1000))

Items travel in chunks sized from measured item times, so thousands of tiny items cost a few dozen
messages while slow items go one at a time and still end up balanced across engines.
"""

from __future__ import annotations

import ast
import math
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import cloudpickle
import numpy as np

from .cellcode import free_names, pack_names, parse_cell
from .dataplane import transport
from .engine.runner import run_pmap_chunk
from .errors import PmapError, RemoteFailure, UsageError
from .session import Session, resolve
from .widgets.progress import progress

__all__ = ["Chunker", "PmapSpec", "pmap", "run", "target_names"]

GUIDED_FACTOR = 4  # a chunk takes at most 1/(factor * engines) of the items still to hand out
TARGET_SECONDS = 0.05  # engine time per chunk: large against the ~2 ms a task costs to send
TAIL_SECONDS = 0.005  # chunks shorter than this gain no balance, only messages
WINDOW = 2  # chunks in flight per engine, so an engine never waits for its next chunk


@dataclass(frozen=True)
class PmapSpec:
    """Options of ``%%pmap``."""

    target: str
    chunksize: int | None = None
    ordered: bool = True
    retries: int = 0
    engines: str | None = None
    progress: bool = True
    transport: str = "auto"
    dashboard: bool | None = None  # None: nbparallel.config.dashboard

    def check(self) -> None:
        if transport.check(self.transport) == transport.DIRECT:
            raise UsageError(
                "%%pmap cannot use --transport direct: a load-balanced chunk goes to whichever "
                "engine is free, which is not known when the chunk is placed. Use auto, shm or "
                "ipp."
            )
        if self.chunksize is not None and self.chunksize < 1:
            raise UsageError(f"--chunksize must be 1 or more, not {self.chunksize}.")
        if self.retries < 0:
            raise UsageError(f"--retries must be 0 or more, not {self.retries}.")


def target_names(target: str) -> set[str]:
    """Names bound by a loop target such as ``x`` or ``i, (a, b)``; raises UsageError if invalid."""
    try:
        node = ast.parse(f"for {target} in (): pass").body[0]
    except SyntaxError:
        raise UsageError(
            f"{target!r} is not a loop variable; write it as in a for loop, like "
            f"`%%pmap x in items -> out` or `%%pmap i, row in enumerate(rows) -> out`."
        ) from None
    return {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}


class Chunker:
    """Decides how many items the next chunk holds (sans-I/O: fed timings, answers ranges).

    With a fixed ``chunksize`` it just counts. Otherwise it starts with one item per chunk, learns
    the time per item from finished chunks, and aims for about ``TARGET_SECONDS`` of work per chunk,
    never more than one engine's share of what is left, and no more than the guided share
    ``remaining / (GUIDED_FACTOR * engines)`` unless that would be under ``TAIL_SECONDS`` of work:
    tiny items travel in a few big chunks, slow items one by one, and the last chunks are small so
    engines finish together.
    """

    def __init__(self, n_items: int, n_engines: int, chunksize: int | None = None):
        self.n_items, self.n_engines, self.chunksize = n_items, n_engines, chunksize
        self.start = 0
        self.per_item: float | None = None
        self.probes = 0  # one-item chunks sent before any timing came back

    @property
    def exhausted(self) -> bool:
        return self.start >= self.n_items

    def next(self) -> range | None:
        """The next chunk, or None when all are handed out or a timing is awaited."""
        remaining = self.n_items - self.start
        if remaining <= 0:
            return None
        if self.chunksize:
            size = self.chunksize
        elif self.per_item is None:
            if self.probes >= self.n_engines:
                return None  # guessing more sizes before a timing arrives only adds messages
            self.probes += 1
            size = 1
        else:
            per_item = max(self.per_item, 1e-7)
            guided = math.ceil(remaining / (GUIDED_FACTOR * self.n_engines))
            # Shrinking chunks only pays when a chunk's time matters: never below TAIL_SECONDS.
            tail = math.ceil(TAIL_SECONDS / per_item)
            share = math.ceil(remaining / self.n_engines)
            size = max(1, min(int(TARGET_SECONDS / per_item), share, max(guided, tail)))
            if remaining <= tail:
                size = remaining  # splitting under TAIL_SECONDS of work buys nothing
        chunk = range(self.start, min(self.start + size, self.n_items))
        self.start = chunk.stop
        return chunk

    def record(self, n_items: int, seconds: float | None) -> None:
        """A chunk of ``n_items`` took ``seconds`` of engine time (None: it was lost)."""
        if seconds is None:
            self.probes = max(0, self.probes - 1)  # a lost probe must not block the rest
        elif n_items:
            latest = seconds / n_items
            # Recent chunks matter most: item cost often drifts along the input.
            self.per_item = latest if self.per_item is None else 0.5 * (self.per_item + latest)


def pmap(
    body: str,
    target: str,
    items: Iterable[Any],
    *,
    chunksize: int | None = None,
    ordered: bool = True,
    retries: int = 0,
    engines: str | Sequence[int] | None = None,
    transport: str = "auto",
    namespace: Mapping[str, Any] | None = None,
    hidden: Sequence[str] = (),
    pool: Session | None = None,
    show_progress: bool = True,
    dashboard: bool | None = None,
    echo: Callable[[str], None] = print,
) -> list[Any]:
    """Run ``body`` once per item of ``items`` with ``target`` bound; return the results.

    The value of the body's last expression is the item's result. Results are in input order
    (completion order with ``ordered=False``). Items whose engine dies are re-run elsewhere up to
    ``retries`` times. Chunks whose items hold large arrays travel through shared memory when
    every engine is on this host (``transport="ipp"`` keeps them in the messages). ``pool`` is
    the session to run on (default: the current one, started if there is none). If any item
    raises, :class:`~nbparallel.errors.PmapError` lists the failed indices and keeps every
    successful result in ``.results``. ``dashboard`` shows (or hides) the live dashboard when the
    map takes more than half a second; None follows ``nbparallel.config.dashboard``.

    >>> nbparallel.pmap("x * x", "x", range(5))
    [0, 1, 4, 9, 16]
    """
    spec = PmapSpec(target, chunksize, ordered, retries, None, show_progress, transport, dashboard)
    if namespace is None:
        namespace = sys._getframe(1).f_globals
    return run(spec, body, items, namespace, hidden=hidden, engines=engines, pool=pool, echo=echo)


def run(spec: PmapSpec, body: str, items: Iterable[Any], namespace: Mapping[str, Any], *,
        hidden: Sequence[str] = (), engines: str | Sequence[int] | None = None,
        pool: Session | None = None, echo: Callable[[str], None] = print) -> list[Any]:
    """Shared by the magic and :func:`pmap`."""
    spec.check()
    bound = target_names(spec.target)
    cell, tree = parse_cell(body, "%%pmap cell", result=True)
    free = free_names(tree)
    if "comm" in free and "comm" not in namespace and "comm" not in bound:
        raise UsageError(
            "`comm` is not defined in %%pmap: items run one at a time on whichever engine is "
            "free, so there are no ranks to exchange data between. Use %%scatter for a cell "
            "whose engines talk to each other (comm.allreduce, comm.halo, ...).")
    names_blob = pack_names(free, namespace, skip=bound | {"xp"} | set(hidden),
                            too_big="Make `{name}` the iterable of items, or build it inside "
                                    "the cell (for example load it from a file there).")
    try:
        items = list(items)
    except TypeError:
        raise UsageError(
            f"%%pmap needs something to iterate over, but got a {type(items).__name__}; write "
            f"`%%pmap x in <list, range or other iterable> -> out`."
        ) from None
    _check_items(items)
    session = resolve(pool, echo)
    ids = session.pool.select(engines if engines is not None else spec.engines)
    if not items:
        return []

    chunker = Chunker(len(items), len(ids), spec.chunksize)
    payloads = _Payloads(session.plane, ids, spec.transport)
    # A chunk lost with its engine comes back under the engine's identity only: name it by id.
    idents = {session.info(e)["ident"]: e for e in ids if session.info(e).get("ident")}

    def submit() -> tuple[Any, range] | None:
        r = chunker.next()
        if r is None:
            return None
        chunk = [(i, items[i]) for i in r]
        size = sum(transport.nbytes_of(item) for _, item in chunk)
        note = payloads.place(chunk, size)
        fut = session.pool.balanced(run_pmap_chunk, cell, spec.target, names_blob, note,
                                    engines=ids, retries=spec.retries)
        payloads.sent(fut, note, size)
        return fut, r

    in_flight: dict[Any, range] = {}
    try:
        with session.monitor.watch("%%pmap", ids, spec.dashboard) as watch:
            return _collect(session, spec, chunker, submit, in_flight, ids, len(items),
                            payloads, watch, idents)
    except KeyboardInterrupt:
        session.pool.interrupt(list(in_flight), ids)
        raise
    finally:
        payloads.close()


#: Item types that always pickle, checked without pickling them.
_PLAIN = (int, float, complex, str, bytes, bool, type(None), np.ndarray)


def _check_items(items: list[Any]) -> None:
    """Refuse, before anything runs, an item that cannot travel to an engine (cloudpickle is
    what carries it: namedtuples of ``itertuples()``, notebook classes and lambdas all do)."""
    for index, item in enumerate(items):
        if isinstance(item, _PLAIN):
            continue
        try:
            cloudpickle.dumps(item)
        except Exception as exc:
            raise UsageError(
                f"%%pmap item {index} (a {type(item).__name__}) cannot be sent to an engine: "
                f"{type(exc).__name__}: {exc}. Iterate over what the item holds instead (for "
                f"example file names rather than open files), or build it inside the cell."
            ) from None


class _Payloads:
    """The chunks in flight and what carries each (the data plane chooses: shared memory when
    every engine is local and the chunk holds large arrays, else the message)."""

    def __init__(self, plane: Any, ids: list[int], transport_name: str):
        self.plane = plane
        self.ids = ids
        self.transport = transport_name
        self._notes: dict[Any, tuple[Any, int]] = {}

    def place(self, chunk: list[tuple[int, Any]], size: int) -> Any:
        return self.plane.place_chunk(self.ids, chunk, size, self.transport)

    def sent(self, fut: Any, note: Any, size: int) -> None:
        self._notes[fut] = (note, size)

    def finished(self, fut: Any, engine: int, held: Sequence[str] | None) -> None:
        note, size = self._notes.pop(fut)
        self.plane.chunk_done(engine, note, size, held)

    def close(self) -> None:
        for note, size in self._notes.values():
            self.plane.chunk_done(-1, note, size, None, account=False)
        self._notes.clear()


def _collect(session: Session, spec: PmapSpec, chunker: Chunker,
             submit: Callable[[], tuple[Any, range] | None], in_flight: dict[Any, range],
             ids: list[int], total: int, payloads: "_Payloads", watch: Any,
             idents: Mapping[Any, int]) -> list[Any]:
    pool = session.pool
    results: list[Any] = [None] * total
    arrival: list[Any] = []
    failures: list[RemoteFailure] = []
    bar = progress(total, "%%pmap", spec.progress)
    done = 0
    while True:
        while len(in_flight) < WINDOW * len(ids) and (job := submit()) is not None:
            in_flight[job[0]] = job[1]
        if not in_flight:
            if chunker.exhausted:
                break
            continue
        pool.wait(list(in_flight), ids, tick=watch.tick, first=True)
        for fut in [f for f in in_flight if f.done()]:
            r = in_flight.pop(fut)
            engine = pool.engine_of(fut, idents)
            pool.relay_output(fut, engine)
            reply, lost = pool.outcome(fut, engine)
            if lost is not None:  # the whole chunk was lost: engine died, retries exhausted
                payloads.finished(fut, engine, None)
                if engine >= 0 and not pool.alive([engine]):
                    session.plane.engine_gone(engine)  # what it held of our segments is free
                if lost.ename == "EngineDied":
                    hint = (f"The items it held were retried {spec.retries} time(s) and lost each "
                            f"time." if spec.retries else
                            "`--retries 1` (retries=1) re-runs the items of an engine that stops "
                            "on the other engines.")
                    lost = replace(lost, traceback=f"{lost.traceback.rstrip()} {hint}\n")
                failures.extend(replace(lost, item=i) for i in r)
                chunker.record(len(r), None)
                done += len(r)
                continue
            payloads.finished(fut, engine, reply.held)
            outcomes = reply.results()
            chunker.record(len(outcomes), reply.seconds)
            session.monitor.span(engine, "pmap", reply.started, reply.started + reply.seconds,
                                 items=len(outcomes))
            for index, ok, value in outcomes:
                if ok:
                    results[index] = value
                    arrival.append(value)
                else:
                    failures.append(replace(value, engine=engine))
            done += len(outcomes)
        bar.update(done)
    bar.close(done)
    if failures:
        raise PmapError(failures, results, total)
    return results if spec.ordered else arrival
