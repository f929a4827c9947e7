"""The notebook side of the data plane: choose a transport per engine, place payloads, bring back
results, and account for every byte.

Transports, chosen per engine:

- ``shm``: the engine shares this host's ``/dev/shm`` (checked with a probe segment, not by
  hostname, so a container with its own /dev/shm is not fooled). Payloads are written once into a
  leased segment; engines write gathered arrays straight into the final array's segment.
- ``direct``: a signed ZeroMQ channel to the engine (``direct.py``) that bypasses the controller.
  Used for engines on other hosts, and for local ones when shared memory has no room.
- ``ipp``: values ride inside ipyparallel's own messages, through the controller.

Small values always ride in the ipyparallel message: for them a segment or a socket round trip
costs more than it saves.
"""

from __future__ import annotations

import atexit
import functools
import secrets
import sys
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import partition
from ..errors import RemoteError, UsageError
from ..reaper import remove_segments
from ..telemetry.records import Ring, Transfer, transfer
from . import parcel
from .shm import Arena, NoRoom, Segment

__all__ = ["DataPlane", "Outbound", "Job", "TRANSPORTS"]

TRANSPORTS = ("auto", "shm", "direct", "ipp")


def check_transport(name: str | None) -> str:
    name = name or "auto"
    if name not in TRANSPORTS:
        raise UsageError(f"unknown transport {name!r}; use one of {', '.join(TRANSPORTS)}.")
    return name


@dataclass
class Outbound:
    """Payloads placed for one call; ``done`` releases what they hold."""

    payloads: list[Any]
    segments: list[Segment] = field(default_factory=list)
    used: list[str] = field(default_factory=list)  # transport actually used, per rank
    #: CuPy arrays of the notebook sent device to device, per rank: name -> parcel.Device.
    device: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Job:
    """One value to bring back: ``sources[rank]`` on each engine, combined by ``op``."""

    name: str
    kind: str
    sources: list[tuple[str, str]]  # ("stash", name) or ("resident", key), per rank
    metas: list[tuple[tuple[int, ...] | None, Any]]  # (shape, dtype), (None, type name)
    axis: int = 0
    op: str = "join"  # join, or a reduce operation


class DataPlane:
    """One per pool. ``transfers`` is the ring of :class:`~nbparallel.telemetry.Transfer` records."""

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
        self._local: dict[int, bool] = {}
        self._channels: dict[int, Any] = {}
        self._endpoints: dict[tuple[int, str], str] = {}
        self._free: dict[int, list[str]] = {}
        self._device_box: Any = None  # a cudaipc.DeviceOutbox once a CuPy array is scattered
        self.closed = False

    # -- engines -------------------------------------------------------------------------------
    def is_local(self, engine: int) -> bool:
        """Whether ``engine`` maps this process's /dev/shm (probed once per engine)."""
        if engine not in self._local:
            self._probe([engine])
        return self._local[engine]

    def _probe(self, engines: list[int]) -> None:
        from ..engine.store import probe

        if not self.arena.ok:
            self._local.update({e: False for e in engines})
            return
        seg = Segment.create(1 << 12, self.arena.owner)
        secret = secrets.token_bytes(16)
        seg.mm[:16] = secret
        try:
            futures = {e: self.pool.apply(e, probe, seg.name, seg.size, secret) for e in engines}
            wait(list(futures.values()), timeout=30)
            for e, fut in futures.items():
                self._local[e] = bool(fut.done() and fut.exception() is None and fut.result())
        finally:
            seg.unlink()
            seg.close()

    def choose(self, engine: int, forced: str) -> str:
        if forced == "auto":
            return "shm" if self.is_local(engine) else "direct"
        if forced == "shm" and not self.is_local(engine):
            raise UsageError(
                f"--transport shm needs engines on this host sharing its /dev/shm, but engine "
                f"{engine} does not. Use --transport direct (or leave the default, auto)."
            )
        return forced

    def endpoint(self, engine: int, cluster: bool = False) -> str:
        """Where ``engine``'s direct channel listens (started on first use).

        Loopback when the engine shares this host, so nothing listens beyond the machine; on
        another host, or with ``cluster`` (engines of other hosts must reach it: a pipeline that
        spans hosts), the address the engine reaches its controller by, on that network alone.
        """
        host = "127.0.0.1" if self.is_local(engine) and not cluster else "cluster"
        if (engine, host) not in self._endpoints:
            from ..engine.store import serve

            self._endpoints[engine, host] = self.pool.apply(engine, serve, host).get(timeout=30)
        return self._endpoints[engine, host]

    def channel(self, engine: int) -> Any:
        """The notebook's direct channel to ``engine``."""
        if engine not in self._channels:
            from .direct import Channel

            self._channels[engine] = Channel(self.endpoint(engine), self.pool.client.session.key)
        return self._channels[engine]

    def chores(self, engine: int) -> dict[str, list[str]]:
        """Housekeeping to piggyback on the next call to ``engine``."""
        todo = {"free": self._free.pop(engine, []), "forget": self.arena.forgotten()}
        return todo if todo["free"] or todo["forget"] else {}

    def free_later(self, engine: int, key: str) -> None:
        """Drop a resident value with the next call to ``engine`` (called from finalizers)."""
        self._free.setdefault(engine, []).append(key)

    def note(self, engine: int, reply: Any) -> None:
        """Record what an engine's reply says it still holds."""
        if isinstance(reply, dict) and "held" in reply:
            self.arena.held(engine, reply["held"])

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
        out = Outbound([None] * len(ids), used=[""] * len(ids), device=[{} for _ in ids])
        if any(_on_device(v) for values in (*per_rank, shared) for v in values.values()):
            per_rank, shared = self._send_device(ids, per_rank, shared, forced, out)
        how = {rank: self.choose(eid, forced) if _large(per_rank[rank], shared) else "ipp"
               for rank, eid in enumerate(ids)}
        shm_ranks = [r for r, h in how.items() if h == "shm"]
        if shm_ranks:
            try:
                self._send_shm(ids, per_rank, shared, shm_ranks, kinds, out)
            except NoRoom as exc:
                if forced == "shm":
                    raise UsageError(
                        f"--transport shm: shared memory cannot take this payload ({exc}). Use "
                        f"--transport direct, or the default (auto), which falls back by itself."
                    ) from None
                for r in shm_ranks:
                    how[r] = "direct"
        for rank, eid in enumerate(ids):
            if how[rank] == "direct":
                self._send_direct(eid, rank, per_rank[rank], shared, kinds, out)
            elif how[rank] == "ipp":
                out.payloads[rank] = {n: parcel.Inline(v) for n, v in {**per_rank[rank], **shared}.items()}
                self._account(eid, kinds, per_rank[rank], shared, "ipp")
            out.used[rank] = how[rank]
        return out

    def _send_device(self, ids: Sequence[int], per_rank: Sequence[dict[str, Any]],
                     shared: dict[str, Any], forced: str,
                     out: Outbound) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Hand the notebook's CuPy shards to GPU engines of this host by CUDA IPC; the rest
        (other engines, broadcast values, a forced transport) go through host memory."""
        from .. import config, gpu

        cp = gpu.cupy_if_device() if forced == "auto" and config.cuda_ipc else None
        rest = []
        for rank, eid in enumerate(ids):
            values = dict(per_rank[rank])
            if cp is not None and self.is_local(eid) and self.pool.info(eid).get("gpu"):
                for name, value in list(values.items()):
                    if not isinstance(value, cp.ndarray):
                        continue
                    try:
                        packed = self._device_outbox(cp).pack(value)
                    except NoRoom:
                        break  # the device outbox is full: the rest go through the host
                    if packed is None:
                        continue  # small: the host is quicker
                    out.device[rank][name] = parcel.Device(packed[0])
                    self.transfers.append(transfer(eid, "scatter", "out", "cuda-ipc", packed[1]))
                    del values[name]
            rest.append(gpu.to_host(values))
        return rest, gpu.to_host(shared)

    def _device_outbox(self, cp: Any) -> Any:
        if self._device_box is None:
            from .cudaipc import DeviceOutbox

            self._device_box = DeviceOutbox(cp, self.arena.owner)
        return self._device_box

    def _send_shm(self, ids: Sequence[int], per_rank: Sequence[dict[str, Any]],
                  shared: dict[str, Any], ranks: list[int], kinds: tuple[str, str],
                  out: Outbound) -> None:
        layout = parcel.Layout()
        makers = {(r, n): layout.add(v) for r in ranks for n, v in per_rank[r].items()}
        shared_makers = {n: layout.add(v, readonly=True) for n, v in shared.items()}
        seg = self.arena.lease(layout.nbytes) if layout.nbytes else None
        if seg is not None:
            out.segments.append(seg)
            layout.write(seg)
        for r in ranks:
            entries = {n: make(seg) for (rr, n), make in makers.items() if rr == r}
            entries.update({n: make(seg) for n, make in shared_makers.items()})
            out.payloads[r] = entries
            self._account(ids[r], kinds, per_rank[r], shared, "shm")

    def _send_direct(self, eid: int, rank: int, values: dict[str, Any], shared: dict[str, Any],
                     kinds: tuple[str, str], out: Outbound) -> None:
        tid = secrets.token_hex(16)
        header, buffers = parcel.dumps({**values, **shared})
        self.channel(eid).put(tid, header, [b.raw() for b in buffers])
        out.payloads[rank] = parcel.Direct(tid, tuple(shared))
        self._account(eid, kinds, values, shared, "direct")

    def _account(self, eid: int, kinds: tuple[str, str], values: dict[str, Any],
                 shared: dict[str, Any], how: str) -> None:
        for kind, group in zip(kinds, (values, shared)):
            if group:
                self.transfers.append(transfer(eid, kind, "out", how, sum(map(_size, group.values()))))

    def account_in(self, engine: int, kind: str, value: Any) -> None:
        """A result that came back inside an ipyparallel reply."""
        self.transfers.append(transfer(engine, kind, "in", "ipp", _size(value)))

    def done(self, out: Outbound) -> None:
        """The call is over: its segments may be reused once no engine holds a view of them."""
        for seg in out.segments:
            self.arena.release(seg)
        out.segments.clear()

    # -- engines to notebook -------------------------------------------------------------------
    def bring_back(self, ids: Sequence[int], jobs: Sequence[Job], transport: str = "auto") -> dict[str, Any]:
        """Gather or reduce each job's values from the engines with one call per engine."""
        from ..engine.store import collect

        forced = check_transport(transport)
        requests: list[list[tuple]] = [[] for _ in ids]
        finals: dict[str, tuple[Segment, np.ndarray]] = {}
        parts_segment: Segment | None = None
        plans: dict[str, list[tuple[str, Any]]] = {}
        how = [self.choose(eid, forced) for eid in ids]
        part_layout = parcel.Layout()
        for job in jobs:
            final = self._final(job, how)
            if final is not None:
                finals[job.name] = final
                seg, shape, dtype = final[0], final[1].shape, final[1].dtype
                lo = 0
                for r, (shp, _) in enumerate(job.metas):
                    requests[r].append((job.sources[r], ("shm", (seg.name, seg.size, 0, shape, dtype,
                                                                 job.axis, lo))))
                    lo += shp[job.axis]
                continue
            plan = []
            for r, (shp, dt) in enumerate(job.metas):
                if job.sources[r][0] == "here":
                    plan.append(("here", None))
                elif shp is None:
                    plan.append(("ipp", None))
                elif how[r] == "shm":
                    nbytes = int(np.prod(shp, dtype=np.int64)) * np.dtype(dt).itemsize
                    plan.append(("shm", part_layout.reserve(nbytes)))
                elif how[r] == "direct":
                    plan.append(("direct", secrets.token_hex(16)))
                else:
                    plan.append(("ipp", None))
            plans[job.name] = plan
        try:
            if part_layout.nbytes:
                parts_segment = self.arena.lease(part_layout.nbytes)
        except NoRoom:
            parts_segment = None
            for plan in plans.values():
                for r, (kind, _) in enumerate(plan):
                    if kind == "shm":
                        plan[r] = ("direct", secrets.token_hex(16))
        for job in jobs:
            for r, (kind, where) in enumerate(plans.get(job.name, ())):
                shp, dt = job.metas[r]
                if kind == "here":
                    continue
                if kind == "shm":
                    dest = (parts_segment.name, parts_segment.size, where, shp, dt, 0, 0)
                    requests[r].append((job.sources[r], ("shm", dest)))
                else:
                    requests[r].append((job.sources[r], (kind, where)))
        for r, eid in enumerate(ids):
            if any(plan[r][0] == "direct" for plan in plans.values()):
                self.channel(eid)  # starts the engine's server before collect offers it parts
        try:
            replies = self._run_collect(ids, requests, collect)
            return self._assemble(ids, jobs, finals, plans, parts_segment, replies, how)
        except BaseException:
            for seg, _ in finals.values():
                self.arena.release(seg)
            raise
        finally:
            if parts_segment is not None:
                self.arena.release(parts_segment)

    def _final(self, job: Job, how: list[str]) -> tuple[Segment, np.ndarray] | None:
        """A segment for the joined array, when every engine can write its part straight into it."""
        if job.op != "join" or any(h != "shm" for h in how):
            return None
        if any(src[0] == "here" for src in job.sources) or any(s is None for s, _ in job.metas):
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
        except NoRoom:
            return None
        tok = seg.token(0, nbytes)
        return seg, tok.view(dtype).reshape(shape)

    def _run_collect(self, ids: Sequence[int], requests: list[list[tuple]], collect: Any) -> list[Any]:
        futures = [self.pool.apply(eid, collect, requests[r], self.chores(eid))
                   for r, eid in enumerate(ids)]
        try:
            wait(futures)
        except KeyboardInterrupt:
            self.pool.interrupt(futures, list(ids))
            raise
        replies, failures = [], []
        for r, (eid, fut) in enumerate(zip(ids, futures)):
            try:
                reply = fut.result()
            except Exception as exc:
                failures.append(self.pool.failure(exc, eid, rank=r))
                continue
            self.note(eid, reply)
            replies.append(reply)
        if failures:
            raise RemoteError("bringing results back", failures)
        return replies

    def _assemble(self, ids: Sequence[int], jobs: Sequence[Job], finals: dict, plans: dict,
                  parts_segment: Segment | None, replies: list[Any], how: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        position = [0] * len(ids)
        for job in jobs:
            if job.name in finals:
                seg, arr = finals[job.name]
                self.arena.lend(seg, arr.base if arr.base is not None else arr)
                for r, eid in enumerate(ids):
                    position[r] += 1
                    self.transfers.append(transfer(eid, job.kind, "in", "shm", _meta_bytes(job.metas[r])))
                out[job.name] = arr
                continue
            parts, tokens = [], []
            for r, eid in enumerate(ids):
                kind, where = plans[job.name][r]
                shp, dt = job.metas[r]
                if kind == "here":
                    parts.append(job.sources[r][1])
                    continue
                if kind == "shm":
                    nbytes = _meta_bytes(job.metas[r])
                    tokens.append(parts_segment.token(where, nbytes))
                    part = tokens[-1].view(np.dtype(dt)).reshape(shp)
                elif kind == "direct":
                    header, frames = self.channel(eid).get(where)
                    part = parcel.loads(header, list(frames))
                else:
                    part = replies[r]["values"][position[r]]
                position[r] += 1
                parts.append(part)
                nbytes = _meta_bytes(job.metas[r]) if job.metas[r][0] is not None else _size(part)
                self.transfers.append(transfer(eid, job.kind, "in", kind, nbytes))
            if job.op == "join":
                out[job.name] = partition.join(parts, job.axis, job.name, list(ids))
            else:
                out[job.name] = partition.reduce(job.op, parts, job.axis, job.name, list(ids))
            del parts
            for tok in tokens:
                # A "list" reduce returns the parts themselves: the segment stays theirs.
                self.arena.lend(parts_segment, tok)
        return out

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self, engines_live_on: bool = False) -> None:
        """Close channels and unlink every segment.

        Engines of a connected cluster outlive the pool: they are asked to drop their resident
        values, stashes and mappings, so nothing of this session stays on them.
        """
        if engines_live_on:
            from ..engine.store import reset

            try:
                futures = [self.pool.apply(e, reset) for e in self.pool.ids]
                wait(futures, timeout=5)
            except Exception:
                pass  # a cluster that is gone holds nothing of ours either
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        if self._device_box is not None:
            self._device_box.close()
            self._device_box = None
        self._at_exit()
        atexit.unregister(self._at_exit)
        self.closed = True


def _leave(arena: Arena) -> None:
    """Unlink the segments of ``arena`` and those engines made under its name."""
    arena.close()
    # Engines name their pipeline hand-off segments after the arena too (dataplane/handoff.py),
    # also those of an engine that died; other pools of this kernel keep theirs.
    remove_segments(arena.owner)


def _on_device(value: Any) -> bool:
    # By the type's module: CuPy is imported only when the notebook already holds its arrays.
    return type(value).__module__.startswith("cupy")


def _large(values: dict[str, Any], shared: dict[str, Any]) -> bool:
    return any(_size(v) >= parcel.INLINE_LIMIT for v in (*values.values(), *shared.values()))


def _size(value: Any) -> int:
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
