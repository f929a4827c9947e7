"""The notebook's half of the data plane: place payloads for engines, bring results back, and
account for every byte, once per placement.

Which transport carries each hop is the chooser's answer (``transport.choose``); the transports
themselves live in ``transports/``, one module each, and this module never branches on their
names except where results are laid out in one shared-memory segment (the array-aware part:
engines write their parts straight into the final array). The engine's half is ``remote.py``.
"""

from __future__ import annotations

import atexit
import functools
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import partition, tables
from ..errors import UsageError
from ..reaper import alive, remove_segments
from ..telemetry.records import Ring, Transfer, transfer
from .. import gpu
from . import parcel, remote
from .addresses import route_address
from .direct import Channel
from .server import Server
from .shm import Arena, NoRoom, Segment
from .transport import (ANY_ENGINE, CUDA_IPC, DIRECT, INLINE, INLINE_LIMIT, SHM, Full, Hop,
                        choose, registered)
from .transport import check as check_transport
from .transports.direct import DirectDest, new_dest
from .transports.inline import InReply
from .transports.shm import FrameDest, OutboxDest, ShmDest

__all__ = ["DataPlane", "Outbound", "Job", "Here"]


@dataclass
class Outbound:
    """Payloads placed for one call: ``notes[rank]`` go to the call's engine of that rank;
    ``done`` releases what they hold."""

    notes: list[list[Any]]


@dataclass(frozen=True)
class Here:
    """A result that already came back in the engine's reply."""

    value: Any


@dataclass(frozen=True)
class Job:
    """One value to bring back: ``sources[rank]`` on each engine, combined by ``op``."""

    name: str
    kind: str
    sources: tuple[remote.Source | Here, ...]
    metas: tuple[tuple[tuple[int, ...] | None, Any], ...]  # (shape, dtype), (None, type name)
    axis: int = 0
    op: str = "join"  # join, or a reduce operation


class DataPlane:
    """One per pool. ``transfers`` is the ring of :class:`~nbparallel.telemetry.Transfer` records.

    ``pool`` is the connection to the engines (:class:`~nbparallel.pool.Pool`): the plane sends
    its engine-side functions through it and waits through its one wait loop.
    """

    def __init__(self, pool: Any, budget: int | None = None):
        self.pool = pool
        self.arena = Arena(budget)
        # A script or kernel that ends without stopping its pool must not leave segments in
        # /dev/shm: neither its own nor the engines' hand-off segments, named after it too. The
        # engines do not remove theirs (a stopped engine gets no chance), and the reaper only
        # does when it sees the kernel die before the engines.
        self._at_exit = functools.partial(_leave, self.arena)  # holds the arena, not the pool
        atexit.register(self._at_exit)
        self.transfers: Ring[Transfer] = Ring()
        self.transports = {t.name: t(self) for t in registered()}
        self._local: dict[int, bool] = {}
        self._channels: dict[int, Any] = {}
        self._endpoints: dict[tuple[int, str], str] = {}
        self._free: dict[int, list[str]] = {}
        self._abandoned: dict[int, list[str]] = {}  # engine -> offered transfers to drop
        self._server: Server | None = None
        self._server_endpoints: dict[str, str] = {}
        self._lingering: list[tuple[str, Any]] = []
        self.closed = False

    # -- engines -------------------------------------------------------------------------------
    def is_local(self, engine: int) -> bool:
        """Whether ``engine`` maps this process's /dev/shm (probed once per engine)."""
        if engine not in self._local:
            self._probe([engine])
        return self._local.get(engine, False)

    def _probe(self, engines: list[int]) -> None:
        if not self.arena.ok:
            self._local.update({e: False for e in engines})
            return
        try:
            seg = Segment.create(1 << 12, self.arena.owner)
        except NoRoom:  # /dev/shm is full now: not local for this hop, asked again next time
            return
        secret = secrets.token_bytes(16)
        seg.mm[:16] = secret
        try:
            answers = self.pool.call_each(engines, remote.probe, seg.name, seg.size, secret,
                                          timeout=30, what="the shared-memory probe")
            self._local.update({e: answers.get(e) is True for e in engines})
        finally:
            seg.unlink()
            seg.close()

    def hop(self, engine: int, nbytes: int, **how: Any) -> Hop:
        """The chooser's view of a hop of ``nbytes`` to (or from) ``engine``; the engine is
        probed for shared memory only when the hop is large enough for that to matter."""
        local = self.is_local(engine) if nbytes >= INLINE_LIMIT else False
        return Hop(local=local, nbytes=nbytes, **how)

    def endpoint(self, engine: int, cluster: bool = False) -> str:
        """Where ``engine``'s direct channel listens (started on first use).

        Loopback when the engine shares this host, so nothing listens beyond the machine; on
        another host, or with ``cluster`` (engines of other hosts must reach it: a pipeline that
        spans hosts), the address the engine reaches its controller by, on that network alone.
        """
        local = self.is_local(engine) and not cluster
        host = "127.0.0.1" if local else self.pool.info(engine).get("address", "0.0.0.0")
        if (engine, host) not in self._endpoints:
            self._endpoints[engine, host] = self.pool.call(engine, remote.serve, host, timeout=30,
                                                           what="its direct channel to start")
        return self._endpoints[engine, host]

    def channel(self, engine: int) -> Any:
        """The notebook's direct channel to ``engine``."""
        if engine not in self._channels:
            self._channels[engine] = Channel(self.endpoint(engine), self.pool.key,
                                             gone=functools.partial(self._gone, engine))
        return self._channels[engine]

    def _gone(self, engine: int) -> str | None:
        """Why ``engine`` can no longer answer its channel, or None while it can: its process
        is gone (engines of this host, seen at once) or the controller dropped it."""
        pid = self.pool.info(engine).get("pid")
        if self.is_local(engine) and isinstance(pid, int) and pid > 0 and not alive(pid):
            return f"engine {engine} (pid {pid}) has stopped"
        if not self.pool.alive([engine]):
            return f"engine {engine} has stopped (the controller no longer lists it)"
        return None

    def channel_stats(self, timeout: float = 5.0) -> dict[int, dict[str, int]]:
        """Per engine, what its direct channel has seen (messages ``refused``, transfers
        ``pending``); engines busy for longer than ``timeout`` are left out."""
        return self.pool.call_each(self.pool.ids, remote.channel_stats, timeout=timeout,
                                   what="its channel's counts")

    def chores(self, engine: int) -> remote.Chores | None:
        """Housekeeping to piggyback on the next call to ``engine`` (None: there is none)."""
        todo = remote.Chores(tuple(self._free.pop(engine, ())), tuple(self.arena.forgotten()),
                             tuple(self._abandoned.pop(engine, ())))
        return todo if todo.free or todo.forget or todo.discard else None

    def free_later(self, engine: int, key: str) -> None:
        """Drop a resident value with the next call to ``engine`` (called from finalizers)."""
        self._free.setdefault(engine, []).append(key)

    def held(self, engine: int, names: Sequence[str] | None) -> None:
        """Record the segments an engine's reply says it still holds views of."""
        if names is not None:
            self.arena.held(engine, list(names))

    def engine_gone(self, engine: int) -> None:
        self.arena.engine_gone(engine)
        self._local.pop(engine, None)
        for key in [k for k in self._endpoints if k[0] == engine]:
            del self._endpoints[key]
        ch = self._channels.pop(engine, None)
        if ch is not None:
            ch.close()

    # -- notebook to engines -------------------------------------------------------------------
    def send(self, ids: Sequence[int], per_rank: Sequence[dict[str, Any]], shared: dict[str, Any],
             kinds: tuple[str, str] = ("scatter", "broadcast"), transport: str = "auto") -> Outbound:
        """Place ``per_rank[r]`` for engine ``ids[r]`` and ``shared`` for all of them."""
        forced = check_transport(transport)
        out = Outbound([[] for _ in ids])
        try:
            per_rank, shared = self._send_device(ids, per_rank, shared, forced, out)
            # A hop is as large as its largest value: smaller ones ride inline whatever carries it.
            sizes = [max(_largest(shared), _largest(values)) for values in per_rank]
            how = {r: choose(self.hop(eid, sizes[r]), forced, (), eid) for r, eid in enumerate(ids)}
            full: set[str] = set()
            while how:
                name = next(iter(how.values()))
                ranks = [r for r, h in how.items() if h == name]
                try:
                    notes = self.transports[name].place([ids[r] for r in ranks],
                                                        [per_rank[r] for r in ranks], shared)
                except Full as exc:
                    if forced != "auto":
                        raise UsageError(
                            f"--transport {forced}: shared memory cannot take this payload "
                            f"({exc}). Use --transport direct, or the default (auto), which "
                            f"falls back by itself.") from None
                    full.add(name)
                    for r in ranks:
                        how[r] = choose(self.hop(ids[r], sizes[r]), forced, full, ids[r])
                    continue
                for r, note in zip(ranks, notes):
                    out.notes[r].append(note)
                    self._account(ids[r], kinds, per_rank[r], shared, name,
                                  getattr(note, "in_place", (0, 0)))
                    del how[r]
        except BaseException:
            self.done(out)
            raise
        return out

    def _send_device(self, ids: Sequence[int], per_rank: Sequence[dict[str, Any]],
                     shared: dict[str, Any], forced: str,
                     out: Outbound) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The notebook's CuPy arrays: each one the chooser gives to CUDA IPC goes device to
        device; the rest (other engines, broadcast values, a forced transport, full slots)
        come back to be sent from host memory."""
        if not any(_on_device(v) for values in (*per_rank, shared) for v in values.values()):
            return list(per_rank), shared
        rest = []
        for rank, eid in enumerate(ids):
            values = dict(per_rank[rank])
            gpu_engine = bool(self.pool.info(eid).get("gpu"))
            for name, value in list(values.items()):
                if not _on_device(value):
                    continue
                hop = self.hop(eid, _size(value), device=True, gpu=gpu_engine)
                if choose(hop, forced, (), eid) != CUDA_IPC:
                    continue
                try:
                    note, = self.transports[CUDA_IPC].place([eid], [{name: value}], {})
                except Full:
                    continue  # its slots are taken: this one goes through the host
                out.notes[rank].append(note)
                self.transfers.append(transfer(eid, "scatter", "out", CUDA_IPC, value.nbytes))
                del values[name]
            rest.append(gpu.to_host(values))
        return rest, gpu.to_host(shared)

    def _account(self, eid: int, kinds: tuple[str, str], values: dict[str, Any],
                 shared: dict[str, Any], how: str, in_place: tuple[int, int] = (0, 0)) -> None:
        # Bytes copied: an array already in shared memory is handed over where it lies.
        for kind, group, here in zip(kinds, (values, shared), in_place):
            if group:
                self.transfers.append(transfer(eid, kind, "out", how,
                                               sum(map(_size, group.values())) - here))

    def account_in(self, engine: int, kind: str, value: Any) -> None:
        """A result that came back inside an ipyparallel reply."""
        self.transfers.append(transfer(engine, kind, "in", INLINE, _size(value)))

    def done(self, out: Outbound) -> None:
        """The call is over: its segments may be reused once no engine holds a view of them."""
        notes = [n for mine in out.notes for n in mine]
        for name, t in self.transports.items():
            t.release([n for n in notes if n.transport == name])
        out.notes = [[] for _ in out.notes]

    # -- the notebook's own channel server (a map's engines take chunks from it) -----------------
    def server(self) -> Server:
        """The notebook's channel server, started on first use (loopback only until an engine
        of another host needs it)."""
        if self._server is None:
            self._server = Server(self.pool.key, "127.0.0.1")
            self._server_endpoints["127.0.0.1"] = self._server.endpoint
        return self._server

    def server_endpoint(self, engine: int) -> str:
        """Where ``engine`` reaches :meth:`server`: loopback from this host; from another, this
        machine's address on the route to that engine, and only there."""
        server = self.server()
        host = "127.0.0.1"
        if not self.is_local(engine):
            address = self.pool.info(engine).get("address", "127.0.0.1")
            host = route_address(address) if address not in ("0.0.0.0", "") else "127.0.0.1"
        if host not in self._server_endpoints:
            self._server_endpoints[host] = server.listen(host)
        return self._server_endpoints[host]

    def linger(self, prefix: str, future: Any) -> None:
        """A map's task that may still take what is offered under ``prefix``: dropped once it
        has ended (:meth:`sweep_feeds`)."""
        self._lingering.append((prefix, future))

    def sweep_feeds(self) -> None:
        """Forget what ended maps left on the server (offers nobody took, late results)."""
        keep = []
        for prefix, future in self._lingering:
            if future.done():
                self.server().discard_prefix(prefix)
            else:
                keep.append((prefix, future))
        self._lingering = keep

    # -- a load-balanced map's chunks ------------------------------------------------------------
    def place_chunk(self, engines: Sequence[int], items: list[Any], nbytes: int,
                    transport: str = "auto") -> Any:
        """The note for one ``%%pmap`` chunk, which may land on any of ``engines``: in shared
        memory when every one of them maps this host's, else in the message."""
        far = [e for e in engines if not self.is_local(e)] if nbytes >= INLINE_LIMIT else engines
        hop = Hop(receiver=ANY_ENGINE, local=not far, nbytes=nbytes)
        name = choose(hop, transport, (), far[0] if far else -1)
        carrier = self.transports[name]
        try:
            note, = carrier.place([-1], [{"items": items}], {})  # -1: whichever engine is free
        except Full:
            note, = self.transports[INLINE].place([-1], [{"items": items}], {})
        return note

    def chunk_done(self, engine: int, note: Any, nbytes: int, held: Sequence[str] | None,
                   account: bool = True) -> None:
        """A chunk came back (or was lost): account for it and release what it held."""
        self.held(engine, held)
        if account:
            self.transfers.append(transfer(engine, "payload", "out", note.transport, nbytes))
        self.transports[note.transport].release([note])

    # -- engines to notebook -------------------------------------------------------------------
    def bring_back(self, ids: Sequence[int], jobs: Sequence[Job], transport: str = "auto") -> dict[str, Any]:
        """Gather or reduce each job's values from the engines with one call per engine."""
        forced = check_transport(transport)
        requests: list[list[remote.Request]] = [[] for _ in ids]
        dests: dict[str, list[Any]] = {}
        finals: dict[str, tuple[Segment, Any]] = {}  # an array, or a frame's columns
        shm_parts: list[tuple[str, int, int]] = []  # (job, rank, offset in the parts segment)
        part_layout = parcel.Layout()
        how = [choose(self.hop(eid, INLINE_LIMIT, sender="engine", receiver="notebook"), forced,
                       (), eid) for eid in ids]
        for job in jobs:
            framed = self._final_frame(job, how)
            if framed is not None:
                finals[job.name] = framed
                for r, dest in enumerate(framed[1].dests):
                    requests[r].append(remote.Request(job.sources[r], dest))
                dests[job.name] = list(framed[1].dests)
                continue
            final = self._final(job, how)
            if final is not None:
                finals[job.name] = final
                seg, arr = final
                lo, dests[job.name] = 0, []
                for r, (shp, _) in enumerate(job.metas):
                    dest = ShmDest(seg.name, seg.size, 0, arr.shape, arr.dtype, job.axis, lo)
                    dests[job.name].append(dest)
                    requests[r].append(remote.Request(job.sources[r], dest))
                    lo += shp[job.axis]
                continue
            plan: list[Any] = []
            for r, (shp, dt) in enumerate(job.metas):
                if isinstance(job.sources[r], Here):
                    plan.append(None)
                elif shp is None:  # not an array: pickled, its buffers where the engine can put them
                    plan.append(OutboxDest(self.arena.owner) if how[r] == SHM
                                else new_dest() if how[r] == DIRECT else InReply())
                elif how[r] == SHM:
                    plan.append(None)
                    shm_parts.append((job.name, r, part_layout.reserve(_meta_bytes(job.metas[r]))))
                elif how[r] == DIRECT:
                    plan.append(new_dest())
                else:
                    plan.append(InReply())
            dests[job.name] = plan
        parts: Segment | None = None
        if shm_parts:
            try:
                parts = self.transports[SHM].lease(part_layout.nbytes)
            except Full:
                parts = None  # no room: those parts come over the direct channels instead
        by_name = {job.name: job for job in jobs}
        for name, r, offset in shm_parts:
            shp, dt = by_name[name].metas[r]
            dests[name][r] = (ShmDest(parts.name, parts.size, offset, tuple(shp), dt)
                              if parts is not None else new_dest())
        for job in jobs:
            if job.name in finals:
                continue
            for r, dest in enumerate(dests[job.name]):
                if dest is not None:
                    requests[r].append(remote.Request(job.sources[r], dest))
        for r, eid in enumerate(ids):
            if any(isinstance(d[r], DirectDest) for d in dests.values()):
                self.channel(eid)  # starts the engine's server before collect offers it parts
        try:
            replies = self._run_collect(ids, requests)
            return self._assemble(ids, jobs, finals, dests, replies)
        except BaseException:
            for seg, _ in finals.values():
                self.arena.release(seg)
            # Parts the engines offered on their channels and nobody will fetch now: dropped
            # with the next call to each engine, not kept until the pool stops.
            for r, eid in enumerate(ids):
                for plan in dests.values():
                    if isinstance(plan[r], DirectDest):
                        self._abandoned.setdefault(eid, []).append(plan[r].tid)
            raise
        finally:
            if parts is not None:
                self.transports[SHM].release([ShmDest(parts.name, parts.size, 0, (0,), "u1")])

    @staticmethod
    def _written_in_place(job: Job, how: list[str]) -> bool:
        """Whether every engine can write its part of ``job`` into the notebook's memory."""
        return (job.op == "join" and all(h == SHM for h in how)
                and not any(isinstance(src, Here) for src in job.sources))

    def _final(self, job: Job, how: list[str]) -> tuple[Segment, np.ndarray] | None:
        """A segment for the joined array, when every engine can write its part straight into it."""
        if not self._written_in_place(job, how) or any(s is None for s, _ in job.metas):
            return None
        shapes = [tuple(s) for s, _ in job.metas]
        dtypes = {d for _, d in job.metas}
        rest = {s[:job.axis] + s[job.axis + 1:] for s in shapes}
        if len(dtypes) != 1 or len(rest) != 1 or any(len(s) <= job.axis for s in shapes):
            return None  # let partition.join explain the mismatch with the parts in hand
        shape = list(shapes[0])
        shape[job.axis] = sum(s[job.axis] for s in shapes)
        dtype = np.dtype(dtypes.pop())
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        try:
            seg = self.arena.lease(max(nbytes, 1))
        except Exception:  # NoRoom: the parts come back one by one instead
            return None
        tok = seg.token(0, nbytes)
        return seg, tok.view(dtype).reshape(shape)

    def _final_frame(self, job: Job, how: list[str]) -> tuple[Segment, _FrameFinal] | None:
        """The joined frame's columns in one segment, when every part is a plain-NumPy frame of
        the same columns that its engine can write straight into them (no concat here)."""
        if not self._written_in_place(job, how):
            return None
        metas = [d for _, d in job.metas]
        if not all(isinstance(m, tables.TableMeta) and m.schema is not None for m in metas):
            return None
        first = metas[0].schema
        if not all(first.fits(m.schema) for m in metas[1:]):
            return None  # let partition.join explain the mismatch with the parts in hand
        counts = [m.rows for m in metas]
        rows = sum(counts)
        span = tables.joined_range([m.schema for m in metas], counts)
        layout = parcel.Layout()
        offsets = tuple(layout.reserve(rows * d.itemsize) for d in first.dtypes)
        index_dtype = np.dtype(np.int64) if isinstance(first.index, tuple) else first.index
        index = None if span is not None else (layout.reserve(rows * index_dtype.itemsize),
                                                index_dtype)
        try:
            seg = self.arena.lease(max(layout.nbytes, 1))
        except Exception:  # NoRoom: the parts come back one by one instead
            return None
        dests, lo = [], 0
        for n in counts:
            dests.append(FrameDest(seg.name, seg.size, offsets, first.dtypes, rows, lo, index))
            lo += n
        return seg, _FrameFinal(first, tuple(dests), span, seg.token(0, max(layout.nbytes, 1)))

    def _run_collect(self, ids: Sequence[int], requests: list[list[remote.Request]]
                     ) -> list[remote.CollectReply]:
        futures = [self.pool.apply(eid, remote.collect, requests[r], self.chores(eid))
                   for r, eid in enumerate(ids)]
        self.pool.wait(futures, ids)
        replies = self.pool.results(futures, ids, "bringing results back")
        for eid, reply in zip(ids, replies):
            self.held(eid, reply.held)
        return replies

    def _assemble(self, ids: Sequence[int], jobs: Sequence[Job], finals: dict,
                  dests: dict[str, list[Any]], replies: list[remote.CollectReply]
                  ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        position = [0] * len(ids)
        for job in jobs:
            if job.name in finals and isinstance(finals[job.name][1], _FrameFinal):
                seg, ff = finals[job.name]
                self.arena.lend(seg, ff.token)
                for r, eid in enumerate(ids):
                    position[r] += 1
                    self.transfers.append(transfer(eid, job.kind, "in", SHM, job.metas[r][1].nbytes))
                out[job.name] = ff.frame()
                continue
            if job.name in finals:
                seg, arr = finals[job.name]
                self.arena.lend(seg, arr.base if arr.base is not None else arr)
                for r, eid in enumerate(ids):
                    position[r] += 1
                    self.transfers.append(transfer(eid, job.kind, "in", SHM, _meta_bytes(job.metas[r])))
                out[job.name] = arr
                continue
            parts = []
            for r, eid in enumerate(ids):
                dest, source = dests[job.name][r], job.sources[r]
                if isinstance(source, Here):
                    parts.append(source.value)
                    continue
                inline = replies[r].values[position[r]]
                part = self.transports[dest.transport].fetch(eid, dest, inline)
                position[r] += 1
                parts.append(part)
                nbytes = _meta_bytes(job.metas[r]) if job.metas[r][0] is not None else _size(part)
                carried = dest.carried(inline) if isinstance(dest, OutboxDest) else dest.transport
                self.transfers.append(transfer(eid, job.kind, "in", carried, nbytes))
            if job.op == "join":
                out[job.name] = partition.join(parts, job.axis, job.name, list(ids))
            else:
                out[job.name] = partition.reduce(job.op, parts, job.axis, job.name, list(ids))
            del parts
        return out

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self, engines_live_on: bool = False) -> None:
        """Close channels and unlink every segment.

        Engines of a connected cluster outlive the pool: they are asked to drop their resident
        values, stashes and mappings, so nothing of this session stays on them.
        """
        if engines_live_on:
            try:
                self.pool.call_each(self.pool.ids, remote.reset, timeout=5,
                                    what="engines to forget this session")
            except Exception:
                pass  # a cluster that is gone holds nothing of ours either
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in self.transports.values():
            t.close()
        self._at_exit()
        atexit.unregister(self._at_exit)
        self.closed = True


@dataclass(frozen=True)
class _FrameFinal:
    """A gathered DataFrame's column arrays in one leased segment (``token`` is its base)."""

    schema: Any
    dests: tuple[FrameDest, ...]
    span: tuple[int, int] | None  # the joined RangeIndex, or None: the index values are written
    token: np.ndarray

    def frame(self) -> Any:
        d = self.dests[0]
        columns = [d.column(self.token, i) for i in range(len(d.dtypes))]
        index = self.span if self.span is not None else d.index_values(self.token)
        return tables.frame(self.schema, columns, index)


def _leave(arena: Arena) -> None:
    """Unlink the segments of ``arena`` and those engines made under its name."""
    arena.close()
    # Engines name their pipeline hand-off segments after the arena too (dataplane/handoff.py),
    # also those of an engine that died; other pools of this kernel keep theirs.
    remove_segments(arena.owner)


def _on_device(value: Any) -> bool:
    # By the type's module: CuPy is imported only when the notebook already holds its arrays.
    return type(value).__module__.startswith("cupy")


def _largest(values: dict[str, Any]) -> int:
    return max(map(_size, values.values()), default=0)


def _size(value: Any) -> int:
    if tables.is_table(value):
        return tables.nbytes(value)  # sys.getsizeof would walk every string of a frame
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    try:
        return sys.getsizeof(value)
    except TypeError:
        return 0


def _meta_bytes(meta: tuple[tuple[int, ...], str]) -> int:
    shape, dtype = meta
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
