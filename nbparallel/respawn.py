"""Engines that come back: a started pool's dead engines replaced, each new one in the old one's
rank.

ipyparallel never replaces an engine (its issue #706 asks for it), and a new engine always
gets a new id. So the pool keeps its ranks in :attr:`Pool.order <nbparallel.pool.Pool>`: the
replacement of engine 1 takes engine 1's place in that list, and with it its rank in every
``%%scatter`` and its place in the pipeline. :func:`replace` does the engine part (start, wait
for registration, GPU binding, the watchdog); the session re-runs what lived on the old engine
(``Session.heal``).

An engine that keeps dying (the OOM killer, a crash in a native library) is replaced at most
:data:`MAX_REPLACEMENTS` times in :data:`WINDOW` seconds; then the pool goes on without it and
says why.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from .errors import PoolError
from .format import ranges

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["dead", "replace", "MAX_REPLACEMENTS", "WINDOW"]

#: Replacements of one rank allowed within :data:`WINDOW` seconds.
MAX_REPLACEMENTS = 3
WINDOW = 300.0


def dead(pool: "Pool") -> list[int]:
    """The engines of ``pool``'s ranks that have stopped and are to be replaced."""
    if not pool.respawn or pool.cluster is None or pool.stopped or not pool.order:
        return []
    live = set(pool.client.ids)
    return [e for e in pool.order if e not in live and e not in pool.given_up]


def replace(pool: "Pool", timeout: float, say: Callable[[str], None] = print) -> dict[int, int]:
    """Start an engine for each dead one, in its rank; returns old id -> new id (empty when
    none died). Raises :class:`PoolError` if the new engines do not register within
    ``timeout`` seconds."""
    gone = dead(pool)
    if not gone:
        return {}
    now = time.monotonic()
    for e in list(gone):
        rank = pool.order.index(e)
        times = [t for t in pool.replaced_at.get(rank, []) if now - t < WINDOW]
        if len(times) >= MAX_REPLACEMENTS:
            pool.given_up.add(e)
            gone.remove(e)
            say(f"nbparallel: engine {e} (rank {rank}) died {len(times) + 1} times in "
                f"{WINDOW:g} s, so it is not replaced again: the pool goes on without it. Look "
                f"for what kills it (memory: `dmesg`, the engine's log in the profile's log "
                f"folder), then `%nbp restart`.")
        pool.replaced_at[rank] = times + [now]
    if not gone:
        return {}
    before = set(pool.client.ids)
    pool.cluster.start_engines_sync(n=len(gone))
    deadline = time.monotonic() + timeout
    while len(set(pool.client.ids) - before) < len(gone):
        if time.monotonic() > deadline:
            got = len(set(pool.client.ids) - before)
            raise PoolError(
                f"replacing engine(s) {ranges(gone)}: {got} of {len(gone)} new engines registered "
                f"within {timeout:g} s. The new engines' logs (ipengine-*.log in the profile's "
                f"log folder) say why; `%nbp restart` starts the whole pool afresh.")
        time.sleep(0.05)
    new = sorted(set(pool.client.ids) - before)[:len(gone)]
    mapping = dict(zip(gone, new))
    pool.adopt(mapping)
    return mapping
