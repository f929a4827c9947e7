"""An engine's data-plane state: mapped segments, resident shards, stashed outputs, its channel.

This module's globals live in the engine process for as long as it runs (one engine, one store).
The notebook reaches it only through the functions below, sent by reference through ipyparallel.

Views into shared memory are built on tokens (``shm.Segment.token``); a weak reference per token
says whether the cell left a view alive, and :func:`held` reports the segments that still have one
so the notebook does not overwrite them.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np

from ..dataplane import parcel
from ..dataplane.shm import Segment

__all__ = ["token", "stored", "keep", "stash", "take_stash", "clear_stash", "held", "chores",
           "open_payload", "serve", "offer", "write_array", "collect", "probe", "reset", "cluster_address", "channel_stats", "discard_run", "resident_keys"]

_segments: dict[str, Segment] = {}
_tokens: dict[str, list[weakref.ref]] = {}
_resident: dict[str, Any] = {}
_stash: dict[str, Any] = {}
_server: Any = None


def token(name: str, size: int, offset: int, nbytes: int) -> np.ndarray:
    """A tracked uint8 view of ``nbytes`` at ``offset`` of segment ``name`` (mapped once, kept)."""
    seg = _segments.get(name)
    if seg is None:
        seg = _segments[name] = Segment.attach(name, size)
    base = seg.token(offset, nbytes)
    _tokens.setdefault(name, []).append(weakref.ref(base))
    return base


def stored(key: str) -> Any:
    try:
        return _resident[key]
    except KeyError:
        raise LookupError(
            f"resident value {key} is not on this engine any more (it was freed, or the engine "
            f"restarted); scatter it again."
        ) from None


def keep(key: str, value: Any) -> None:
    _resident[key] = value


def resident_keys() -> list[str]:
    return list(_resident)


def stash(name: str, value: Any) -> None:
    _stash[name] = value


def take_stash(name: str) -> Any:
    return _stash.pop(name)


def clear_stash() -> None:
    _stash.clear()


def held(collect: bool = True) -> list[str]:
    """Segments some live view still points into.

    A view the store itself keeps (a stashed output, a resident shard) explains why a segment is
    alive. Anything else may be garbage in a reference cycle (a function defined in a cell keeps
    its namespace alive), so then the cycle collector runs once: it costs tens of ms in an
    engine, too much to pay on every call.
    """
    alive = _alive()
    if collect and set(alive) - _explained():
        gc.collect()
        alive = _alive()
    return alive


def _explained() -> set[str]:
    spans = [(name, seg.address(), seg.size) for name, seg in _segments.items()]
    names = set()
    for value in (*_stash.values(), *_resident.values()):
        if isinstance(value, np.ndarray):
            addr = value.__array_interface__["data"][0]
            names.update(name for name, lo, size in spans if lo <= addr < lo + size)
    return names


def _alive() -> list[str]:
    names = []
    for name in list(_tokens):
        refs = [r for r in _tokens[name] if r() is not None]
        if refs:
            _tokens[name] = refs
            names.append(name)
        else:
            del _tokens[name]
    return names


def chores(todo: dict[str, list[str]] | None) -> None:
    """Housekeeping the notebook piggybacks on a call: free resident keys, unmap dropped segments."""
    if not todo:
        return
    for key in todo.get("free", ()):
        _resident.pop(key, None)
    for name in todo.get("forget", ()):
        seg = _segments.pop(name, None)
        if seg is not None:
            seg.close()  # views still alive keep the mapping until they go


def open_payload(payload: Any) -> dict[str, Any]:
    """The named values a notebook payload stands for."""
    if payload is None:
        return {}
    if isinstance(payload, parcel.Direct):
        header, frames = _server.take(payload.tid)
        # zmq frames are read-only; a shard the cell may write to needs its own memory.
        values = parcel.loads(header, [bytearray(f) for f in frames])
        for name in payload.readonly:
            if isinstance(values.get(name), np.ndarray):
                values[name].flags.writeable = False
        return values
    return {name: _device(entry) if isinstance(entry, parcel.Device) else
            parcel.open_entry(entry, token, stored) for name, entry in payload.items()}


def _device(entry: parcel.Device) -> Any:
    from .. import gpu
    from ..dataplane import cudaipc

    return cudaipc.receive(gpu.cupy_if_device(), entry.note)


def write_array(value: Any, dest: tuple) -> None:
    """Write ``value`` into the notebook's array described by ``dest``, at ``lo`` along ``axis``."""
    name, size, offset, shape, dtype, axis, lo = dest
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    final = token(name, size, offset, nbytes).view(dtype).reshape(shape)
    index = (slice(None),) * axis + (slice(lo, lo + value.shape[axis]),)
    final[index] = value


def collect(requests: list[tuple], todo: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Deliver stashed or resident values as the notebook asks: into a segment, offered on the
    direct channel, or returned in the reply."""
    from .. import gpu

    chores(todo)
    values: list[Any] = []
    for (where, name), (how, dest) in requests:
        value = gpu.to_host(take_stash(name) if where == "stash" else stored(name))
        if how == "shm":
            write_array(value, dest)
            values.append(None)
        elif how == "direct":
            offer(dest, value)
            values.append(None)
        else:
            values.append(value)
        del value
    return {"values": values, "held": held()}


def reset() -> None:
    """Forget everything the notebook left here (it disconnected from this cluster)."""
    global _server
    from .stages import close_outbox

    close_outbox()
    _resident.clear()
    _stash.clear()
    for seg in _segments.values():
        seg.close()
    _segments.clear()
    if _server is not None:
        _server.close()
        _server = None
    _endpoints.clear()


def probe(name: str, size: int, secret: bytes) -> bool:
    """Whether this engine sees the notebook's /dev/shm: it can read the secret the notebook wrote."""
    try:
        seg = Segment.attach(name, size)
    except OSError:
        return False
    try:
        return bytes(seg.mm[:len(secret)]) == secret
    finally:
        seg.close()


#: Where this engine's channel listens, by the address it was asked for.
_endpoints: dict[str, str] = {}

#: Set on an engine whose cluster reaches it by another address than the route to its controller.
ADDRESS_VAR = "NBPARALLEL_DATAPLANE_IP"


def serve(host: str) -> str:
    """Start this engine's direct channel (once) and return its endpoint on ``host``.

    ``host`` is an address of this machine, or ``"cluster"``: the one the rest of the cluster
    reaches this engine by (see :func:`cluster_address`). One channel can listen on several
    addresses, e.g. loopback for the notebook and the cluster's network for a pipeline stage on
    another host.
    """
    global _server
    if host == "cluster":
        host = cluster_address()
    if _server is None:
        from IPython import get_ipython

        from ..dataplane.direct import Server

        _server = Server(get_ipython().kernel.session.key, host)
        _endpoints[host] = _server.endpoint
    elif host not in _endpoints:
        _endpoints[host] = _server.listen(host)
    return _endpoints[host]


def cluster_address() -> str:
    """This engine's address on the network it shares with its controller.

    The interface of the route to the controller, so a channel listens on that one network and
    nowhere else; ``$NBPARALLEL_DATAPLANE_IP`` overrides it where the notebook reaches engines by
    another network. Loopback when the controller is on this machine's loopback.
    """
    import os
    from urllib.parse import urlsplit

    from ..dataplane.addresses import route_address

    if os.environ.get(ADDRESS_VAR):
        return os.environ[ADDRESS_VAR]
    try:
        from ipyparallel.engine.app import IPEngine

        if IPEngine.initialized():
            controller = urlsplit(IPEngine.instance().registration_url).hostname
            if controller:
                return route_address(controller)
    except (ImportError, OSError, ValueError):
        pass
    return "0.0.0.0"  # not an ipyparallel engine (or no route): every interface


def discard_run(prefix: str) -> int:
    """Drop transfers of an aborted pipeline run that arrived but will never be taken."""
    return _server.discard_prefix(prefix) if _server is not None else 0


def channel_stats() -> dict[str, int]:
    """What this engine's direct channel has seen: messages refused, transfers waiting."""
    if _server is None:
        return {"refused": 0, "pending": 0}
    return {"refused": _server.refused, "pending": _server.pending()}


def offer(tid: str, value: Any) -> None:
    header, buffers = parcel.dumps(value)
    _server.offer(tid, header, [b.raw() for b in buffers])
