"""Data parallelism: scatter named values, run the same code on every shard, gather or reduce.

The Python twin of ``%%scatter``::

    out = nbparallel.scatter(
        "c = a * w + b\\ns = float(c.sum())",
        {"a": a, "b": b}, broadcast={"w": w}, gather=["c"], reduce={"s": "sum"},
    )
    out["c"], out["s"]

Everything that can be checked is checked before anything is sent; results are combined in full
before they are returned, so a failure never leaves a caller with half of its names updated.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from . import partition, tables
from .cellcode import analyse, pack_names
from .comm.setup import check_backend, check_timeout, open_comm
from .dataplane import transport
from .dataplane.plane import Here, Job
from .dataplane.remote import Kept, Source
from .engine.replies import ScatterReply
from .engine.runner import run_scatter
from .errors import RemoteError, UsageError
from .relay import Relay
from .resident import Resident
from .session import Session, resolve
from .telemetry.records import transfer

__all__ = ["ScatterSpec", "scatter", "run", "RUNNER_NAMES"]

#: Names the runner defines in every scatter cell.
RUNNER_NAMES = ("rank", "size", "xp", "halo", "comm")


@dataclass(frozen=True)
class ScatterSpec:
    """What to send and what to bring back; built by the magic from its options."""

    scatter: tuple[str, ...] = ()
    broadcast: tuple[str, ...] = ()
    gather: tuple[str, ...] = ()
    reduce: tuple[tuple[str, str], ...] = ()
    axis: int | str = 0  # a str: an xarray dimension name
    halo: int = 0
    engines: str | None = None
    keep: tuple[str, ...] = ()
    transport: str = "auto"
    dashboard: bool | None = None  # None: nbparallel.config.dashboard
    comm_timeout: float | None = None  # None: nbparallel.config.comm_timeout
    comm: str = "auto"  # the comm backend: auto, shm or direct
    by: str | None = None  # hash-partition table rows by this column instead of by position

    def outputs(self) -> list[str]:
        return list(self.gather) + [name for name, _ in self.reduce] + list(self.keep)

    def check(self) -> None:
        """Reject contradictory option sets before anything else happens."""
        seen = _roles((("scattered", self.scatter), ("broadcast", self.broadcast)),
                      lambda n, a, b: f"`{n}` is listed twice (as {a} and as {b}); list each "
                                      f"input once, either before the options to split it or "
                                      f"after --broadcast.")
        outs = _roles((("--gather", self.gather), ("--reduce", [n for n, _ in self.reduce]),
                       ("--keep", self.keep)),
                      lambda n, a, b: f"`{n}` is asked for twice ({a} and {b}); bring each "
                                      f"result back one way.")
        for name, op in self.reduce:
            if op not in partition.REDUCE_OPS:
                raise UsageError(
                    f"unknown reduce operation {op!r} in --reduce {name}={op}; use one of "
                    f"{', '.join(partition.REDUCE_OPS)}."
                )
        reserved = sorted((set(seen) | set(outs)) & set(RUNNER_NAMES))
        if reserved:
            raise UsageError(
                f"{', '.join(reserved)} cannot be scattered, broadcast or returned: the cell gets "
                f"its own {', '.join(RUNNER_NAMES)} on every engine. Rename your variable."
            )
        if self.halo and not self.scatter:
            raise UsageError("--halo needs at least one scattered name to take rows from.")
        if self.by is not None:
            if not self.scatter:
                raise UsageError(f"--by {self.by} needs a scattered table to partition.")
            if self.halo:
                raise UsageError(
                    f"--halo and --by {self.by} do not go together: hash-partitioned rows have "
                    f"no neighbours. Drop one of them."
                )
        transport.check(self.transport)
        check_timeout(self.comm_timeout)
        check_backend(self.comm)


def _roles(groups: Sequence[tuple[str, Sequence[str]]],
           twice: Callable[[str, str, str], str]) -> dict[str, str]:
    """Map each name to its role; a name in two roles is a UsageError worded by ``twice``."""
    seen: dict[str, str] = {}
    for role, names in groups:
        for name in names:
            _check_identifier(name, role)
            if name in seen:
                raise UsageError(twice(name, seen[name], role))
            seen[name] = role
    return seen


def _check_identifier(name: str, role: str) -> None:
    if not name.isidentifier():
        raise UsageError(f"{name!r} ({role}) is not a valid Python name.")


@dataclass
class _Plan:
    engines: list[int]
    per_rank: list[dict[str, Any]] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)
    stored: list[dict[str, str]] = field(default_factory=list)  # name -> resident key, in place
    halos: list[tuple[int, int]] = field(default_factory=list)
    note: str | None = None  # a word for the user about the split (an --by skew)


def _plan(spec: ScatterSpec, values: Mapping[str, Any], engines: list[int],
          plane: Any) -> _Plan:
    n = len(engines)
    plan = _Plan(engines, [dict() for _ in engines], {}, [dict() for _ in engines], [(0, 0)] * n)
    values = dict(values)
    in_place = {}
    for name in [*spec.scatter, *spec.broadcast]:
        if isinstance(values[name], Resident):
            handle = values[name]
            if name in spec.scatter and spec.by is None and _fits(handle, spec, engines, plane):
                in_place[name] = handle
            else:  # another layout: gather it, then split it again like any array
                values[name] = handle.gather()
    lengths = {name: in_place[name].length if name in in_place
               else partition.length(values[name], spec.axis, name) for name in spec.scatter}
    if len(set(lengths.values())) > 1:
        got = ", ".join(f"`{k}` has {v}" for k, v in lengths.items())
        raise UsageError(
            f"scattered names must have the same length along axis {spec.axis} so that row i of "
            f"each lands on the same engine, but {got}. Scatter them in separate cells, or "
            f"--broadcast the ones that every engine needs whole."
        )
    if spec.by is not None:
        _plan_by(spec, values, engines, plan)
        for name in spec.broadcast:
            plan.shared[name] = values[name]
        return plan
    for name in spec.scatter:
        if name in in_place:
            for rank in range(n):
                plan.stored[rank][name] = in_place[name].key
            continue
        for rank, shard in enumerate(partition.split(values[name], n, spec.axis, spec.halo, name)):
            plan.per_rank[rank][name] = shard.value
            plan.halos[rank] = shard.halo
    if in_place and len(in_place) < len(spec.scatter):
        _check_rows(spec, in_place, engines, lengths)
    elif in_place:  # alone, shards need not split evenly (a --by result), only alike
        _check_alike(in_place)
    for name in spec.broadcast:
        plan.shared[name] = values[name]
    return plan


def _plan_by(spec: ScatterSpec, values: dict[str, Any], engines: list[int], plan: _Plan) -> None:
    """--by: every scattered name split by the same row positions, the key's hash decides."""
    positions, _ = tables.by_key({nm: values[nm] for nm in spec.scatter}, spec.by, len(engines))
    for name in spec.scatter:
        for rank, part in enumerate(tables.take_each(values[name], positions, spec.axis, name)):
            plan.per_rank[rank][name] = part
    plan.note = tables.skew_note([len(p) for p in positions], engines, spec.by)


def _fits(handle: Resident, spec: ScatterSpec, engines: list[int], plane: Any) -> bool:
    """Whether a resident value's shards can be used where they are."""
    return (handle.alive and handle._plane() is plane and handle.engines == list(engines)
            and handle.axis == spec.axis and spec.halo == 0
            and (handle.shape is not None or handle.is_table))


def _check_alike(in_place: dict[str, Resident]) -> None:
    rows = {name: [p["rows"][1] - p["rows"][0] for p in h.placement()] for name, h in in_place.items()}
    if len({tuple(r) for r in rows.values()}) > 1:
        got = ", ".join(f"`{n}` {r}" for n, r in rows.items())
        raise UsageError(
            f"the kept shards hold different rows per engine ({got}), so row i of one would not "
            f"meet row i of the other. Gather one of them (handle.gather()) to split it afresh."
        )


def _check_rows(spec: ScatterSpec, in_place: dict[str, Resident], engines: list[int],
                lengths: dict[str, int]) -> None:
    """Shards used in place must line up row for row with what the other names are split into."""
    total = next(iter(lengths.values()))
    expected = [b - a for a, b in partition.bounds(total, len(engines))]
    for name, handle in in_place.items():
        rows = [p["rows"][1] - p["rows"][0] for p in handle.placement()]
        if rows != expected:
            raise UsageError(
                f"the shards of `{name}` hold {rows} rows per engine, but this cell splits "
                f"{total} rows as {expected}. Pass np.asarray({name}) to re-partition it."
            )


def scatter(
    code: str,
    data: Mapping[str, Any] | None = None,
    *,
    broadcast: Mapping[str, Any] | None = None,
    gather: Sequence[str] = (),
    reduce: Mapping[str, str] | None = None,
    axis: int | str = 0,
    halo: int = 0,
    by: str | None = None,
    engines: str | Sequence[int] | None = None,
    keep: Sequence[str] = (),
    transport: str = "auto",
    dashboard: bool | None = None,
    comm_timeout: float | None = None,
    comm: str = "auto",
    namespace: Mapping[str, Any] | None = None,
    hidden: Sequence[str] = (),
    pool: Session | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``code`` on every engine over shards of ``data``; return gathered and reduced values.

    ``data`` values are split along ``axis`` like ``numpy.array_split`` (``halo`` extra rows from
    each neighbour): arrays, lists, pandas frames and series, Arrow tables, xarray values (whose
    ``axis`` may be a dimension name). ``by`` names a column instead: the rows of the tables in
    ``data`` are hash-partitioned so that each key is on one engine (``tables.by_key``).
    ``broadcast`` values go whole to every engine. Other names the code reads are
    taken from ``namespace`` (default: the caller's globals) and sent automatically when small.
    In the code, ``rank``, ``size``, ``xp``, ``halo`` and ``comm`` (collectives between the
    engines, :class:`~nbparallel.comm.Comm`; each wait bounded by ``comm_timeout`` seconds) are
    defined (``comm="shm"`` or ``"direct"`` forces its backend). Names in ``keep`` stay on
    the engines and come back as :class:`~nbparallel.Resident` handles, which a later call can
    take in ``data`` without moving a byte. ``transport`` forces ``"shm"``, ``"direct"`` or
    ``"ipp"`` instead of choosing per engine. ``pool`` is the session to run on (default: the
    current one, started if there is none). ``dashboard`` shows (or hides) the live dashboard
    when the call takes more than half a second; None follows ``nbparallel.config.dashboard``.

    >>> nbparallel.scatter("y = x * 2", {"x": np.arange(6)}, gather=["y"])["y"]
    array([ 0,  2,  4,  6,  8, 10])
    >>> nbparallel.scatter("t = df.groupby('k').v.sum()", {"df": df}, by="k", gather=["t"])["t"]
    """
    data = dict(data or {})
    bcast = dict(broadcast or {})
    spec = ScatterSpec(tuple(data), tuple(bcast), tuple(gather), tuple((reduce or {}).items()),
                       axis, halo, None, tuple(keep), transport, dashboard, comm_timeout, comm,
                       by)
    if namespace is None:
        namespace = sys._getframe(1).f_globals
    return run(spec, code, {**data, **bcast}, namespace, hidden=hidden,
               engines=engines, pool=pool, echo=echo)


def run(spec: ScatterSpec, code: str, values: Mapping[str, Any], namespace: Mapping[str, Any], *,
        hidden: Sequence[str] = (), engines: str | Sequence[int] | None = None,
        pool: Session | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Shared by the magic and :func:`scatter`: check, plan, send, wait, combine."""
    spec.check()
    cell, free = analyse(code, "%%scatter cell")
    skip = set(spec.scatter) | set(spec.broadcast) | set(RUNNER_NAMES) | set(hidden)
    names_blob = pack_names(free, namespace, skip=skip)
    session = resolve(pool, echo)
    ids = session.pool.select(engines if engines is not None else spec.engines)
    plane = session.plane
    plan = _plan(spec, values, ids, plane)
    if plan.note:
        echo(plan.note)
    outputs = spec.outputs()
    keys = {name: f"{name}-{secrets.token_hex(8)}" for name in spec.keep}
    # Only a cell that uses `comm` pays for one (a control segment, the engines' channels).
    comm = open_comm(plane, ids, spec.comm, spec.comm_timeout) if "comm" in free else None
    out = None
    ok = False
    try:
        out = plane.send(ids, plan.per_rank, plan.shared, transport=spec.transport)
        futures = [
            session.pool.apply_packed(eid, run_scatter, cell, names_blob,
                               [*out.notes[rank], Kept(plan.stored[rank])], rank, len(ids),
                               plan.halos[rank], outputs, keys, plane.chores(eid),
                               comm.spec if comm else None)
            for rank, eid in enumerate(ids)
        ]
        with session.monitor.watch("%%scatter", ids, spec.dashboard) as watch:
            watch.queued({eid: 1 for eid in ids})
            replies = _collect(session, futures, ids, watch)
        result = _combine(spec, replies, ids, plane, keys)
        ok = True
        return result
    finally:
        if out is not None:
            plane.done(out)
        if comm is not None:
            comm.close()
        if not ok:  # shards some engines kept before another failed must not stay behind
            for key in keys.values():
                for eid in ids:
                    plane.free_later(eid, key)


def _collect(session: Session, futures: list[Any], ids: list[int],
             watch: Any) -> list[ScatterReply]:
    pool = session.pool
    relay = Relay()  # what the cell prints shows while it runs

    def tick() -> None:
        watch.tick()
        relay.tick(futures, ids)

    stopped = pool.wait(futures, ids, tick=tick, stop_if=lambda f: _died(pool, f)).stopped
    replies, failures = [], []
    for rank, (eid, fut) in enumerate(zip(ids, futures)):
        pool.relay_output(fut, eid, relay)
        reply, failure = pool.outcome(fut, eid, rank=rank)
        if failure is not None:  # the engine died or the runner could not start
            if not (stopped and failure.ename in _STOPPED):  # stopped by us: not news
                failures.append(failure)
            if not pool.alive([eid]):
                session.plane.engine_gone(eid)
            continue
        session.plane.held(eid, reply.held)
        if reply.time is not None:
            session.monitor.span(eid, "scatter", *reply.time)
        if reply.comm is not None:
            _record_comm(session, eid, ids, reply.comm)
        if reply.failure is not None:
            failures.append(replace(reply.failure, engine=eid))
        replies.append(reply)
    if failures:
        # The rank that failed first is the story; the others only stopped waiting for it.
        failures.sort(key=lambda f: f.ename in _RELEASED)
        raise RemoteError("the %%scatter cell", failures)
    for eid, reply in zip(ids, replies):
        if not reply.ok:
            missing = ", ".join(f"`{m}`" for m in reply.missing)
            raise UsageError(
                f"the cell did not define {missing} on engine {eid} (rank {reply.rank}), so it "
                f"cannot be gathered, reduced or kept. Assign it on every engine, or drop it from "
                f"--gather/--reduce/--keep."
            )
    return replies


#: How an engine interrupted because another one died reports (or fails to report) back.
_STOPPED = ("KeyboardInterrupt", "TimeoutError")
#: How a rank whose comm peer failed reports back.
_RELEASED = ("PeerFailed",)


def _record_comm(session: Session, eid: int, ids: list[int], stats: Any) -> None:
    """A rank's comm calls as spans, and the bytes it read from each peer as transfers."""
    for _, t0, t1 in stats.spans:
        session.monitor.span(eid, "comm", t0, t1)
    for source, nbytes in enumerate(stats.received):
        if nbytes:
            session.monitor.transfers.append(
                transfer(ids[source], "comm", "out", stats.backend, nbytes, peer=eid))


def _died(pool: Any, fut: Any) -> bool:
    """Whether ``fut`` failed because its engine stopped."""
    exc = fut.exception()
    return exc is not None and pool.failure(exc, None).ename == "EngineDied"


def _combine(spec: ScatterSpec, replies: list[ScatterReply], ids: list[int], plane: Any,
             keys: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    jobs = []
    wanted = [(name, "join", "gather") for name in spec.gather]
    wanted += [(name, op, "reduce") for name, op in spec.reduce]
    for name, op, kind in wanted:
        for eid, reply in zip(ids, replies):
            if name in reply.values:
                plane.account_in(eid, kind, reply.values[name])
        if all(name in r.values for r in replies):
            parts = [r.values[name] for r in replies]
            result[name] = (partition.join(parts, spec.axis, name, ids) if op == "join"
                            else partition.reduce(op, parts, spec.axis, name, ids))
            continue
        sources = tuple(Source("stash", name) if name in r.pending else Here(r.values[name])
                        for r in replies)
        metas = tuple(r.pending.get(name) or (None, "") for r in replies)
        jobs.append(Job(name, kind, sources, metas, spec.axis, op))
    if jobs:
        result.update(plane.bring_back(ids, jobs, spec.transport))
    for name, key in keys.items():
        result[name] = Resident(plane, name, key, ids, [r.kept[name] for r in replies],
                                spec.axis, spec.transport)
    return result
