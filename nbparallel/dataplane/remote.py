"""The engine's half of the data plane: mapped segments, resident shards, stashed results, the
engine's signed channel, and engine-to-engine sends.

This module's globals live in the engine process for as long as it runs (one engine, one state).
The notebook reaches it only through the functions below, sent by reference through ipyparallel;
the notebook's half is ``plane.py``. Which transport carried a value is read from the value's
note (``transport.py``); this module never branches on transport names.

Views into shared memory are built on tokens (``shm.Segment.token``); a weak reference per token
says whether the cell left a view alive, and :func:`held` reports the segments that still have one
so the notebook does not overwrite them.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import gpu, tables
from . import transport
from .addresses import check_reachable
from .direct import Channel
from .server import Server
from .shm import Segment

__all__ = ["Source", "Request", "Chores", "Kept", "CollectReply", "token", "stored", "keep", "resident_keys",
           "stash", "take_stash", "clear_stash", "held", "chores", "open_payload", "collect",
           "reset", "probe", "serve", "server", "connect", "send", "receive", "discard_run",
           "channel_stats"]


@dataclass(frozen=True)
class Source:
    """Where a result waits on the engine: a ``"stash"``ed cell output or a ``"resident"`` key."""

    where: str
    key: str


@dataclass(frozen=True)
class Request:
    """Bring ``source`` back to the notebook the way ``dest`` (a transport's note) says."""

    source: Source
    dest: Any


@dataclass(frozen=True)
class Chores:
    """Housekeeping the notebook piggybacks on its next call to an engine: resident keys to
    ``free``, segments the notebook unlinked whose mappings the engine should ``forget``, and
    transfers offered on this engine's channel that nobody will fetch (``discard``)."""

    free: tuple[str, ...] = ()
    forget: tuple[str, ...] = ()
    discard: tuple[str, ...] = ()


@dataclass(frozen=True)
class Kept:
    """Values already on this engine (``--keep`` shards used in place), by resident key."""

    keys: dict[str, str]


@dataclass(frozen=True)
class CollectReply:
    """What :func:`collect` answers: values that ride in the reply (None where they went
    elsewhere), and the segments this engine still holds views of."""

    values: tuple[Any, ...]
    held: tuple[str, ...]


_segments: dict[str, Segment] = {}
#: Live copy-on-write mappings by segment: (a view's weak reference, address, size).
_private: dict[str, list[tuple[weakref.ref, int, int]]] = {}
_tokens: dict[str, list[weakref.ref]] = {}
_resident: dict[str, Any] = {}
_stash: dict[str, Any] = {}
_server: Any = None
_peers: dict[str, Any] = {}
#: Where this engine's channel listens, by the address it was asked for.
_endpoints: dict[str, str] = {}

#: A stage may be slow; Ctrl-C (SIGINT) ends a wait sooner.
PEER_TIMEOUT = 600.0


# -- shared memory the notebook placed values in -------------------------------------------------
def token(name: str, size: int, offset: int, nbytes: int, private: bool = False) -> np.ndarray:
    """A tracked uint8 view of ``nbytes`` at ``offset`` of segment ``name`` (mapped once, kept);
    ``private``: of its copy-on-write mapping (see ``parcel.ArraySlot``)."""
    if private:
        # Mapped afresh each time: a kept copy-on-write mapping would go on showing the pages an
        # earlier cell wrote instead of what the notebook has written there since.
        seg = Segment.attach(name, size, private=True)
        base = seg.token(offset, nbytes)
        _private.setdefault(name, []).append((weakref.ref(base), seg.address(), size))
        seg.close()  # unmapped when the last view goes
        _tokens.setdefault(name, []).append(weakref.ref(base))
        return base
    seg = _segments.get(name)
    if seg is None:
        seg = _segments[name] = Segment.attach(name, size)
    base = seg.token(offset, nbytes)
    _tokens.setdefault(name, []).append(weakref.ref(base))
    return base


def held(collect: bool = True) -> list[str]:
    """Segments some live view still points into.

    A view this module itself keeps (a stashed output, a resident shard) explains why a segment
    is alive. Anything else may be garbage in a reference cycle (a function defined in a cell
    keeps its namespace alive), so then the cycle collector runs once: it costs tens of ms in an
    engine, too much to pay on every call.
    """
    alive = _alive()
    if collect and set(alive) - _explained():
        gc.collect()
        alive = _alive()
    return alive


def _explained() -> set[str]:
    spans = [(name, seg.address(), seg.size) for name, seg in _segments.items()]
    for name, maps in list(_private.items()):
        _private[name] = [m for m in maps if m[0]() is not None]
        spans += [(name, addr, size) for _, addr, size in _private[name]]
    names = set()
    for value in (*_stash.values(), *_resident.values()):
        if isinstance(value, np.ndarray):
            addrs = [value.__array_interface__["data"][0]]
        elif tables.is_table(value):  # a kept frame reads its columns where they were sent
            addrs = tables.addresses(value)
        else:
            continue
        names.update(name for name, lo, size in spans for addr in addrs if lo <= addr < lo + size)
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


def chores(todo: Chores | None) -> None:
    """Do the notebook's housekeeping: free resident keys, unmap the segments it dropped."""
    if todo is None:
        return
    for key in todo.free:
        _resident.pop(key, None)
    for name in todo.forget:
        _private.pop(name, None)
        seg = _segments.pop(name, None)
        if seg is not None:
            seg.close()  # views still alive keep the mapping until they go
    for tid in todo.discard:
        if _server is not None:
            _server.discard(tid)


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


# -- values kept here between cells --------------------------------------------------------------
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


# -- the notebook's values in, results out -------------------------------------------------------
def open_payload(notes: Sequence[Any] | Any) -> dict[str, Any]:
    """The named values the notebook's notes stand for (each note names its transport)."""
    values: dict[str, Any] = {}
    for note in notes if isinstance(notes, (list, tuple)) else [notes]:
        if isinstance(note, Kept):
            values.update({name: stored(key) for name, key in note.keys.items()})
        elif note is not None:
            values.update(transport.get(note.transport).open(note))
    return values


def collect(requests: Sequence[Request], todo: Chores | None = None) -> CollectReply:
    """Deliver stashed or resident values as the notebook asks, each by its dest's transport."""
    chores(todo)
    values: list[Any] = []
    for req in requests:
        value = take_stash(req.source.key) if req.source.where == "stash" else stored(req.source.key)
        values.append(transport.get(req.dest.transport).deliver(req.dest, gpu.to_host(value)))
        del value
    return CollectReply(tuple(values), tuple(held()))


def reset() -> None:
    """Forget everything the notebook left here (it disconnected from this cluster)."""
    global _server
    for t in transport.registered():
        t.reset()
    _resident.clear()
    _stash.clear()
    for seg in _segments.values():
        seg.close()
    _segments.clear()
    _private.clear()
    for ch in _peers.values():
        ch.close()
    _peers.clear()
    if _server is not None:
        _server.close()
        _server = None
    _endpoints.clear()


# -- this engine's signed channel ----------------------------------------------------------------
def server() -> Any:
    """This engine's direct-channel server (started by :func:`serve`)."""
    if _server is None:
        raise RuntimeError("this engine's channel is not started; the notebook starts it first")
    return _server


def serve(host: str) -> str:
    """Start this engine's direct channel (once) and return its endpoint on ``host``.

    ``host`` is an address of this machine: loopback for a notebook on this host, or the one the
    rest of the cluster reaches this engine by (``engine_info()["address"]``, which the notebook
    learnt when the pool first saw the engine). One channel can listen on several addresses, e.g.
    loopback for the notebook and the cluster's network for a pipeline stage on another host.
    """
    global _server
    if _server is None:
        _server = Server(_key(), host)
        _endpoints[host] = _server.endpoint
    elif host not in _endpoints:
        _endpoints[host] = _server.listen(host)
    return _endpoints[host]


def _key() -> bytes:
    from IPython import get_ipython

    return get_ipython().kernel.session.key


def discard_run(prefix: str) -> int:
    """Drop transfers of an aborted pipeline run that arrived but will never be taken."""
    return _server.discard_prefix(prefix) if _server is not None else 0


def channel_stats() -> dict[str, int]:
    """What this engine's direct channel has seen: messages refused, transfers waiting."""
    if _server is None:
        return {"refused": 0, "pending": 0}
    return {"refused": _server.refused, "pending": _server.pending()}


# -- engine to engine ----------------------------------------------------------------------------
def connect(endpoint: str, what: str = "the channel of a neighbouring stage",
            timeout: float = PEER_TIMEOUT, gone: Any = None) -> Any:
    """This engine's (kept) channel to the server at ``endpoint``: another engine's, or the
    notebook's. ``what`` names it in the error when it cannot be reached; ``gone`` is the
    channel's check on whether the server's process has stopped."""
    if endpoint not in _peers:
        # A put waits ``timeout`` for its acknowledgement: find an unreachable server now.
        check_reachable(endpoint, what)
        _peers[endpoint] = Channel(endpoint, _key(), timeout=timeout, gone=gone)
    return _peers[endpoint]


def send(endpoint: str, tid: str, value: Any, owner: str | None,
         to_gpu: bool = False) -> tuple[int, str]:
    """Send ``value`` to the engine whose channel is ``endpoint``; returns bytes moved and the
    transport that carried them.

    ``owner`` (the notebook arena's ``<kernel pid>-<tag>``) is given when both engines share this
    host's ``/dev/shm``; ``to_gpu`` says both are GPU processes of this host.
    """
    # Between GPU processes the device transport looks for CuPy arrays itself, however deeply
    # they are nested; a value whose size cannot be read without pickling it is sized by the
    # transports that pickle it (they say Full when it turns out small).
    on_gpu = to_gpu and gpu.bound() is not None
    size = transport.nbytes_of(value)
    if size == 0 and not isinstance(value, (int, float, complex, str, bytes, type(None))):
        size = transport.HANDOFF_LIMIT
    hop = transport.Hop(transport.ENGINE, transport.ENGINE, owner is not None, size, on_gpu,
                        on_gpu)
    full: list[str] = []
    while True:
        name = transport.choose(hop, without=full)
        try:
            header, frames, nbytes = transport.get(name).pack(value, owner)
        except transport.Full:
            full.append(name)  # no room, or too small to be worth it: the next one then
            continue
        sent = connect(endpoint).put(tid, transport.wire(name, header), frames)
        return (nbytes if nbytes else sent), name


def receive(tid: str, timeout: float = PEER_TIMEOUT) -> Any:
    """The value another engine sent under ``tid``, waiting up to ``timeout`` for it."""
    header, frames = server().take(tid, timeout)
    carrier, inner = transport.unwire(header)
    return carrier.unpack(inner, frames)
