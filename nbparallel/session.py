"""The session: the current pool and what is built beside it, one per kernel.

:class:`~nbparallel.pool.Pool` is the connection to ipyparallel and nothing else. A
:class:`Session` holds it together with the pool's data plane, monitor and pipeline, each given
what it needs (the plane and the monitor get the pool; the pipeline gets all three), so no part
reaches back up for another. Magics and the Python API share the current session, like
matplotlib's current figure.

In a notebook::

    import nbparallel
    session = nbparallel.start(n=2)     # or %nbp start -n 2
    session.status()                    # engine id, host, pid, device, busy/idle
    session.plane.transfers             # every byte moved, by transport
    session.stop()                      # only stops what nbparallel started
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .dataplane.plane import DataPlane
from .dataplane.server import remove_stale_folders
from .errors import PoolError, UsageError
from .format import ranges
from .monitor import Monitor
from .pipeline.runtime import Pipeline
from . import ipcluster
from .controller import connection_file
from . import respawn
from .pool import ENGINE_TIMEOUT, PROBE_TIMEOUT, EngineInfo, Pool
from .telemetry.records import Ring, Transfer

__all__ = ["Session", "start", "connect", "restart", "stop", "current", "ensure", "resolve", "connected"]


class Session:
    """A pool and its data plane, monitor and pipeline; what :func:`start` and :func:`connect`
    return and :func:`current` gives back.

    >>> session = nbparallel.start(2)
    >>> session.ids, session.pool, session.plane.arena.in_use()
    """

    def __init__(self, pool: Pool):
        self.pool = pool
        self.plane = DataPlane(pool)
        self.monitor = Monitor(pool, self.plane.transfers)
        self.pipeline = Pipeline(pool, self.plane, self.monitor)
        self.pipeline.heal = self.heal

    # -- what a user asks of it ------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        return self.pool.ids

    @property
    def how(self) -> str:
        """``"started"`` (nbparallel started the cluster) or ``"connected"``."""
        return self.pool.how

    @property
    def transfers(self) -> Ring[Transfer]:
        """Every transfer the data plane recorded (:class:`~nbparallel.telemetry.Transfer`)."""
        return self.plane.transfers

    def info(self, engine: int) -> dict[str, Any]:
        return self.pool.info(engine)

    def status(self) -> list[EngineInfo]:
        """One row per engine this pool has had (see :meth:`Pool.status`)."""
        return self.pool.status()

    def stop(self) -> None:
        """Close the dashboards and the data plane, then stop (or disconnect from) the pool."""
        if self.pool.stopped:
            return
        try:
            self.monitor.close()
            self.plane.close(engines_live_on=self.pool.cluster is None)
        finally:
            self.pool.stop()
            remove_stale_folders()  # the stopped engines' channel sockets

    def heal(self, say: Callable[[str], None] = print) -> dict[int, int]:
        """Replace the engines of a started pool that died (``Pool.start(respawn=True)``, the
        default), each in its old rank, and restore what lived there: the ``%%stage`` cells
        it held run again (from a data-parallel replica's arrays where one is in step, else
        as the cell makes them); shards kept on it are lost (``Resident.lost`` says which
        rows). Returns old engine -> new engine; cheap when none died.

        >>> session.heal()      # every magic does this first
        {1: 3}
        """
        if not respawn.dead(self.pool):
            return {}
        mapping = respawn.replace(self.pool, ENGINE_TIMEOUT, say)
        if not mapping:
            return {}
        for old in mapping:
            self.plane.engine_gone(old)
        told = self.pipeline.replaced(mapping)
        pairs = ", ".join(f"engine {o} by engine {n}" for o, n in mapping.items())
        say(f"nbparallel: replaced {pairs} (same rank){'; ' + told if told else ''}.")
        return mapping

    def __repr__(self) -> str:
        return f"<nbparallel.Session {self.pool.how}, engines {ranges(self.pool.ids) or 'none'}>"


# -- the current session ------------------------------------------------------------------------
_current: Session | None = None


def current() -> Session | None:
    """The session magics use now, or None."""
    return _current


def _make_current(pool: Pool, say: Callable[[str], None]) -> Session:
    global _current
    try:
        session = Session(pool)
    except BaseException:
        pool.stop()
        raise
    stop()
    _current = session
    if pool.gpu_note:
        say(pool.gpu_note)
    return session


def start(n: int | None = None, *, say: Callable[[str], None] = print, **kwargs: Any) -> Session:
    """Start an embedded local cluster and make it current (stops a previous one we started).

    ``gpus="all"|"none"|[0, 1]`` binds the engines to GPUs (see :meth:`Pool.start`); a note about
    the binding worth knowing (``"all"`` found no device) goes to ``say``.

    >>> session = nbparallel.start(2)
    """
    return _make_current(Pool.start(n, **kwargs), say)


def connect(profile: str | None = None, cluster_id: str | None = None, *,
            say: Callable[[str], None] = print, **kwargs: Any) -> Session:
    """Connect to a running ``ipcluster`` and make it current (``gpus=``, ``wait=``, ``n=`` as
    for :meth:`Pool.connect`).

    >>> session = nbparallel.connect(cluster_id="slurm", wait=600)
    """
    return _make_current(Pool.connect(profile, cluster_id, say=say, **kwargs), say)


def restart(say: Callable[[str], None] = print) -> Session:
    """Stop the current pool and start a fresh one as it was started (engines that died are back).

    Only for a pool nbparallel started: a cluster from ``ipcluster`` is restarted there, then
    ``%nbp connect`` reconnects.
    """
    old = _current
    if old is None or old.how != "started":
        raise UsageError(
            "%nbp restart restarts a pool nbparallel started, and "
            + ("there is none; `%nbp start` starts one." if old is None else
               "this one is a cluster it connected to: restart its engines where it runs "
               "(`ipcluster start`), then `%nbp connect`.")
        )
    kwargs = dict(old.pool.started_with)
    n = kwargs.pop("n", None) or len(old.ids)
    stop()  # first: the new engines must not find the old ones' memory or cores taken
    return start(n, say=say, **kwargs)


def stop() -> None:
    """Stop (or disconnect from) the current pool."""
    global _current
    session, _current = _current, None
    if session is not None:
        session.stop()


def ensure(say: Callable[[str], None] = print) -> Session:
    """The current session; without one, connect to a running default cluster or start a local one.

    A default cluster whose controller runs is never replaced by a local one, even without
    engines yet (a batch job still queued): that is an error saying how to wait for it.
    """
    global _current
    if _current is not None:
        _current.heal(say)
    if _current is not None and _current.ids:
        return _current
    url_file = connection_file(None, None)
    if url_file.exists():
        down = ipcluster.controller_down(url_file)
        if down is None:
            try:
                pool = Pool.connect(timeout=2.0, say=say)
            except PoolError as exc:
                raise PoolError(f"{exc} nbparallel does not start a local cluster while the "
                                f"default one runs; `%nbp start` starts one anyway.") from None
            _current = Session(pool)
            say(f"nbparallel: connected to the running default cluster ({connected(_current)}).")
            return _current
        say(f"nbparallel: the default cluster's connection file is stale ({down}); starting a "
            f"local cluster instead.")
    t0 = time.perf_counter()
    _current = Session(Pool.start())
    say(f"nbparallel: started a local cluster of {len(_current.ids)} engines in "
        f"{time.perf_counter() - t0:.1f} s (`%nbp stop` stops it).")
    return _current


def connected(session: Session) -> str:
    """``"2 engines"``, with the engines still busy and what connecting noticed."""
    count = len(session.ids)
    text = f"{count} engine{'' if count == 1 else 's'}"
    late = session.pool.late
    if late:
        text += (f"; engine(s) {ranges(late)} did not answer within {PROBE_TIMEOUT:g} s (busy with "
                 f"another client's work, or stuck) and join when they do")
    if session.pool.connect_note:
        text += f"; {session.pool.connect_note}"
    return text


def resolve(session: Session | None, say: Callable[[str], None] = print) -> Session:
    """``session`` if given (its dead engines replaced), else the current one (started or
    connected as :func:`ensure` does)."""
    if session is None:
        return ensure(say)
    session.heal(say)
    return session

