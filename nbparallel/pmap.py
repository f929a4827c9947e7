"""Task parallelism: a load-balanced parallel map whose body is a cell.

The Python twin of ``%%pmap x in range(1000) -> squares``::

    squares = nbparallel.pmap("x * x", "x", range(1000))

Items travel in chunks sized from measured item times, so thousands of tiny items cost a few dozen
messages while slow items go one at a time and still end up balanced across engines.
"""

from __future__ import annotations

import ast
import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import cloudpickle
import numpy as np

from .cellcode import analyse, pack_names
from .dataplane import transport
from .errors import PmapError, UsageError
from .feed import Feed
from .session import Session, resolve

__all__ = ["Chunker", "PmapSpec", "pmap", "run", "target_names"]

GUIDED_FACTOR = 4  # a chunk takes at most 1/(factor * engines) of the items still to hand out
TARGET_SECONDS = 0.1  # engine time per chunk: large against the ~0.2 ms a chunk costs to hand over
TAIL_SECONDS = 0.005  # chunks shorter than this gain no balance, only messages


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


@functools.lru_cache(maxsize=256)
def target_names(target: str) -> frozenset[str]:
    """Names bound by a loop target such as ``x`` or ``i, (a, b)``; raises UsageError if invalid."""
    try:
        node = ast.parse(f"for {target} in (): pass").body[0]
    except SyntaxError:
        raise UsageError(
            f"{target!r} is not a loop variable; write it as in a for loop, like "
            f"`%%pmap x in items -> out` or `%%pmap i, row in enumerate(rows) -> out`."
        ) from None
    return frozenset(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))


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
    cell, free = analyse(body, "%%pmap cell", result=True)
    if "comm" in free and "comm" not in namespace and "comm" not in bound:
        raise UsageError(
            "`comm` is not defined in %%pmap: items run one at a time on whichever engine is "
            "free, so there are no ranks to exchange data between. Use %%scatter for a cell "
            "whose engines talk to each other (comm.allreduce, comm.halo, ...).")
    names_blob = pack_names(free, namespace, skip=bound | {"xp"} | set(hidden),
                            too_big="Make `{name}` the iterable of items, or build it inside "
                                    "the cell (for example load it from a file there).")
    items = _sequence(items)
    session = resolve(pool, echo)
    ids = session.pool.select(engines if engines is not None else spec.engines)
    if not len(items):
        return []

    chunker = Chunker(len(items), len(ids), spec.chunksize)
    with session.monitor.watch("%%pmap", ids, spec.dashboard) as watch:
        results, arrival, failures = Feed(session, spec, cell, names_blob, items, ids, chunker,
                                          watch).run()
    if failures:
        raise PmapError(failures, results, len(items))
    return results if spec.ordered else arrival


def _sequence(items: Iterable[Any]) -> Sequence[Any]:
    """What chunks are cut from: a range or a NumPy array as it is (a chunk of one is a slice,
    sent as a range or one buffer, and the engine iterates it as this process would), anything
    else as a list, checked item by item."""
    if isinstance(items, range) or isinstance(items, np.ndarray) and items.ndim >= 1:
        return items
    try:
        items = list(items)
    except TypeError:
        raise UsageError(
            f"%%pmap needs something to iterate over, but got a {type(items).__name__}; write "
            f"`%%pmap x in <list, range or other iterable> -> out`."
        ) from None
    _check_items(items)
    return items


#: Item types that always pickle, checked without pickling them.
_PLAIN = (int, float, complex, str, bytes, bool, type(None), np.ndarray, np.generic)


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
