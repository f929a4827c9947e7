"""An authenticated point-to-point byte channel over ZeroMQ TCP.

Array buffers move between the notebook and the engines (and engine to engine) over this channel
instead of through ipyparallel's controller, which would copy and re-route every byte. A
:class:`Server` lives in the receiving (or serving) process; a :class:`Channel` connects to it.

Wire format. Every message, in both directions, is one ZeroMQ multipart message::

    [b"nbp1", op, tid, sig, header, *buffers]

``op``
    ``b"put"`` (client stores a transfer in the server), ``b"get"`` (client asks for an offered
    transfer), ``b"ok"`` and ``b"err"`` (the server's answers).
``tid``
    The transfer id, UTF-8. A transfer id is used once: sending the very same message twice is
    refused as a replay.
``sig``
    ``sign(key, [b"nbp1", op, tid, header, *buffers])``: HMAC-SHA256 over every other frame, each
    preceded by its length, so frames can be neither altered nor re-split.
``header``
    Opaque bytes for ``put`` and for the ``ok`` answer to a ``get`` (the caller's metadata, e.g.
    a pickled dtype and shape). For ``get`` it is the time the server should wait for the
    transfer to be offered, as a big-endian float64 of seconds, then 16 random bytes that make
    every request's signature unique. For the ``ok`` answer to a ``put`` it is the put's
    signature, which ties the acknowledgement to that one request. For ``err`` it is the reason,
    UTF-8.
``buffers``
    Raw bytes, sent and received without copying.

The server checks the signature (with :func:`hmac.compare_digest`) before it does anything else
with a message, and refuses a message identical to one among the last 10,000 it accepted (a
replay). The client checks the signature of every answer. Nothing here ever unpickles anything:
headers are opaque bytes, and callers unpickle them only after :meth:`Server.take` or
:meth:`Channel.get` returned, that is after the signature was checked.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import math
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

__all__ = ["ChannelError", "sign", "Server", "Channel"]

_log = logging.getLogger("nbparallel.dataplane")

MAGIC = b"nbp1"
PUT, GET, OK, ERR = b"put", b"get", b"ok", b"err"
REPLAY_HISTORY = 10_000
# Longest a parked GET may wait: bounds what one request can hold in the server.
MAX_GET_WAIT = 24 * 3600.0


class ChannelError(Exception):
    """A transfer was refused, timed out, or hit a closed channel or server."""


def sign(key: bytes, parts: Sequence[Any]) -> bytes:
    """HMAC-SHA256 of ``parts`` under ``key``, each part preceded by its length (8 bytes, big-endian).

    Parts may be bytes, memoryviews, zmq frames or any contiguous buffer (numpy arrays included);
    they are hashed in place, never copied.
    """
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        view = _raw(part)
        mac.update(view.nbytes.to_bytes(8, "big"))
        mac.update(view)
    return mac.digest()


def _raw(buf: Any) -> memoryview:
    # PickleBuffer.raw() gives a flat byte view of any contiguous buffer, whatever its format
    # (memoryview.cast refuses non-native formats such as big-endian or structured dtypes).
    # Nothing is pickled or unpickled.
    try:
        return pickle.PickleBuffer(buf).raw()
    except BufferError:
        raise TypeError(
            f"a buffer of type {type(buf).__name__} is not contiguous in memory: "
            "pass a contiguous copy (e.g. numpy.ascontiguousarray(x))."
        ) from None


def _tid_bytes(tid: str) -> bytes:
    if not isinstance(tid, str) or not tid:
        raise ValueError(f"a transfer id must be a non-empty str, not {tid!r}.")
    return tid.encode("utf-8")


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("the key must be non-empty bytes, shared by the Server and its Channels.")
    return bytes(key)


def _advertised_host(host: str) -> str:
    # A wildcard bind is not an address anyone can connect to: advertise what this machine's
    # hostname resolves to, which is what the other machines of a cluster usually use too.
    if host not in ("0.0.0.0", "*"):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return host


def _peer(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return "an unknown peer"


def _show(data: bytes, limit: int = 64) -> str:
    # Transfer ids in log lines come from the network: keep them short and printable.
    text = data.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass
class _Parked:
    """A GET waiting for its transfer to be offered."""

    ident: bytes
    tid: bytes
    wait: float
    deadline: float


class Server:
    """Receives PUTs and serves GETs; lives in an engine (or any process).

    A ROUTER socket bound to ``tcp://host:<free port>``, owned by one background daemon thread;
    the other methods may be called from any thread. ``host`` defaults to loopback; to accept
    other machines pass an address of this machine (an engine uses :func:`~nbparallel.dataplane.addresses.route_address`), or
    ``"0.0.0.0"`` to listen on every interface, in which case :attr:`endpoint` advertises the
    address the hostname resolves to (or ``"0.0.0.0"`` when it does not resolve).
    :meth:`listen` adds another address later.

    Attributes:
        endpoint: where Channels connect, e.g. ``"tcp://127.0.0.1:53211"``.
        refused: how many messages were refused (bad or missing signature, replay, malformed,
            a put for a transfer id already waiting to be taken).
    """

    def __init__(self, key: bytes, host: str = "127.0.0.1"):
        self._key = _check_key(key)
        self.refused = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._inbox: dict[bytes, tuple[bytes, list[memoryview]]] = {}
        self._offered: dict[bytes, tuple[bytes, list[memoryview]]] = {}
        self._seen: set[bytes] = set()
        self._seen_order: collections.deque[bytes] = collections.deque()
        self._closed = False
        self._stop = False
        self._binds: list[tuple[str, Future[str]]] = []

        self._ctx = zmq.Context()
        try:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            # Fail loudly (instead of dropping) when answering a client that has gone away, so
            # an offered transfer is kept for the next GET.
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            port = self._router.bind_to_random_port(f"tcp://{host}")
            wake_addr = f"inproc://nbparallel-dataplane-{id(self):x}-{port}"
            self._wake_in = self._ctx.socket(zmq.PULL)
            self._wake_in.setsockopt(zmq.LINGER, 0)
            self._wake_in.bind(wake_addr)
            # Used by offer/discard/close from any thread, always under self._lock.
            self._wake_out = self._ctx.socket(zmq.PUSH)
            self._wake_out.setsockopt(zmq.LINGER, 0)
            self._wake_out.connect(wake_addr)
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise ChannelError(
                f"could not listen on {host!r} ({e}): pass an address of this machine, "
                "e.g. 127.0.0.1 or 0.0.0.0."
            ) from None
        self.endpoint = f"tcp://{_advertised_host(host)}:{port}"
        # Starting the thread is a memory barrier, so handing it the sockets made here is safe;
        # from now on only that thread touches the router and wake_in.
        self._thread = threading.Thread(target=self._run, name=f"nbparallel-dataplane-{port}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Server {self.endpoint} pending={self.pending()} refused={self.refused}>"

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API for the owning process -------------------------------------------------------

    def take(self, tid: str, timeout: float = 30.0) -> tuple[bytes, list[memoryview]]:
        """Wait until a PUT of transfer ``tid`` has arrived, then remove and return it.

        Returns ``(header, buffers)``; the buffers are memoryviews of the received frames.
        Raises :class:`ChannelError` after ``timeout`` seconds, or when the server is closed.
        """
        key = _tid_bytes(tid)
        deadline = time.monotonic() + timeout
        with self._arrived:
            while key not in self._inbox:
                if self._closed:
                    raise ChannelError(
                        f"transfer {tid!r} cannot be taken: the server {self.endpoint} is closed."
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelError(
                        f"transfer {tid!r} did not arrive at {self.endpoint} within {timeout:g} s: "
                        "check that the sender puts it under this id, with the same key, or allow "
                        "a longer timeout."
                    )
                self._arrived.wait(left)
            return self._inbox.pop(key)

    def offer(self, tid: str, header: bytes, buffers: Sequence[Any]) -> None:
        """Keep ``(header, buffers)`` so that one GET of ``tid`` is answered with them.

        The transfer is forgotten once served; offering the same id again replaces it. The
        buffers are sent without copying, so they must not change until the GET was answered
        (or the transfer discarded).
        """
        key = _tid_bytes(tid)
        item = (bytes(header), [_raw(b) for b in buffers])
        with self._lock:
            if self._closed:
                raise ChannelError(
                    f"transfer {tid!r} cannot be offered: the server {self.endpoint} is closed."
                )
            self._offered[key] = item
            self._wake()

    def discard(self, tid: str) -> None:
        """Drop transfer ``tid``, offered or received but not taken; unknown ids are ignored."""
        key = _tid_bytes(tid)
        with self._lock:
            self._inbox.pop(key, None)
            self._offered.pop(key, None)

    def discard_prefix(self, prefix: str) -> int:
        """Drop every stored transfer whose id starts with ``prefix`` (an aborted run's leftovers)."""
        key = prefix.encode()
        with self._lock:
            stale = [k for k in (*self._inbox, *self._offered) if k.startswith(key)]
            for k in stale:
                self._inbox.pop(k, None)
                self._offered.pop(k, None)
        return len(stale)

    def listen(self, host: str, timeout: float = 10.0) -> str:
        """Accept Channels on ``host`` too (another interface of this machine); returns the
        endpoint there. Transfers are shared: a PUT on either endpoint can be taken once."""
        done: Future[str] = Future()
        with self._lock:
            if self._closed:
                raise ChannelError(f"cannot listen on {host!r}: the server {self.endpoint} is closed.")
            self._binds.append((host, done))
            self._wake()
        return done.result(timeout)

    def pending(self) -> int:
        """How many transfers are stored: received but not taken, plus offered but not served."""
        with self._lock:
            return len(self._inbox) + len(self._offered)

    def close(self) -> None:
        """Stop the thread, close the sockets (dropping whatever is unsent) and forget every transfer.

        Idempotent. Threads blocked in :meth:`take` get a :class:`ChannelError`.
        """
        with self._arrived:
            if self._closed:
                return
            self._closed = True
            self._stop = True
            self._wake()
            self._arrived.notify_all()
        self._thread.join()
        with self._lock:
            self._inbox.clear()
            self._offered.clear()
            for host, done in self._binds:
                done.set_exception(ChannelError(f"cannot listen on {host!r}: the server closed."))
            self._binds.clear()
            self._wake_out.close(linger=0)
        self._ctx.term()

    # -- the server thread ---------------------------------------------------------------

    def _wake(self) -> None:
        # Caller holds self._lock. A full queue means wake-ups are already pending.
        try:
            self._wake_out.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        parked: list[_Parked] = []
        try:
            while not self._stop:
                # Nothing may kill this thread: a bad message must not take the server down.
                try:
                    ready = dict(poller.poll(self._poll_ms(parked)))
                    if self._wake_in in ready:
                        self._drain_wakes()
                        self._bind_requested()
                    if self._router in ready:
                        self._drain_router(parked)
                    self._answer_parked(parked)
                except Exception:
                    _log.exception(
                        "nbparallel data plane server %s: unexpected error; still serving", self.endpoint
                    )
                    time.sleep(0.05)  # don't spin if the error repeats
            for p in parked:
                self._send(p.ident, ERR, p.tid, b"the server is closing")
        except Exception:
            _log.exception("nbparallel data plane server %s: error while closing", self.endpoint)
        finally:
            self._router.close(linger=0)
            self._wake_in.close(linger=0)

    @staticmethod
    def _poll_ms(parked: list[_Parked]) -> int | None:
        if not parked:
            return None
        left = min(p.deadline for p in parked) - time.monotonic()
        return max(0, math.ceil(left * 1000))

    def _drain_wakes(self) -> None:
        while True:
            try:
                self._wake_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _bind_requested(self) -> None:
        with self._lock:
            todo, self._binds = self._binds, []
        for host, done in todo:
            try:
                port = self._router.bind_to_random_port(f"tcp://{host}")
            except zmq.ZMQError as e:
                done.set_exception(ChannelError(
                    f"could not listen on {host!r} ({e}): pass an address of this machine."))
            else:
                done.set_result(f"tcp://{_advertised_host(host)}:{port}")

    def _drain_router(self, parked: list[_Parked]) -> None:
        # Bounded, so parked GETs and close() still get a turn under a flood.
        for _ in range(1000):
            try:
                frames = self._router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(frames, parked)
            except Exception:
                _log.exception("nbparallel data plane server %s: failed to handle a message", self.endpoint)

    def _handle(self, frames: list[zmq.Frame], parked: list[_Parked]) -> None:
        ident, parts = frames[0].bytes, frames[1:]
        if len(parts) < 5:
            tid = parts[2].bytes if len(parts) > 2 else b""
            reason = f"malformed message ({len(parts)} frames, at least 5 expected)"
            return self._refuse(ident, tid, frames, reason)
        magic, op, tid_frame, sig_frame, header, *buffers = parts
        tid, sig = tid_frame.bytes, sig_frame.bytes
        if not hmac.compare_digest(sign(self._key, [magic, op, tid_frame, header, *buffers]), sig):
            reason = "signature did not match (wrong key, or an altered message)"
            return self._refuse(ident, tid, frames, reason)
        if sig in self._seen:
            return self._refuse(ident, tid, frames, "replay of a message already received")
        self._remember(sig)
        if magic.bytes != MAGIC:
            return self._refuse(ident, tid, frames, f"unknown protocol {_show(magic.bytes)}, expected 'nbp1'")
        kind = op.bytes
        if kind == PUT:
            with self._arrived:
                duplicate = tid in self._inbox
                if not duplicate:
                    self._inbox[tid] = (header.bytes, [f.buffer for f in buffers])
                    self._arrived.notify_all()
            if duplicate:
                reason = "a transfer with this id is already waiting to be taken"
                return self._refuse(ident, tid, frames, reason)
            self._send(ident, OK, tid, sig)
        elif kind == GET:
            wait = self._get_wait(header.bytes)
            if wait is None:
                return self._refuse(ident, tid, frames, "malformed get request")
            parked.append(_Parked(ident, tid, wait, time.monotonic() + wait))
        else:
            self._refuse(ident, tid, frames, f"unexpected op {_show(kind)}")

    @staticmethod
    def _get_wait(header: bytes) -> float | None:
        if len(header) < 8:
            return None
        (wait,) = struct.unpack(">d", header[:8])
        if not 0 <= wait <= MAX_GET_WAIT:  # also rejects NaN
            return None
        return wait

    def _remember(self, sig: bytes) -> None:
        self._seen.add(sig)
        self._seen_order.append(sig)
        if len(self._seen_order) > REPLAY_HISTORY:
            self._seen.discard(self._seen_order.popleft())

    def _refuse(self, ident: bytes, tid: bytes, frames: list[zmq.Frame], reason: str) -> None:
        self.refused += 1
        _log.warning(
            "nbparallel data plane server %s refused a message from %s for transfer %s: %s",
            self.endpoint,
            _peer(frames[-1]),
            _show(tid),
            reason,
        )
        self._send(ident, ERR, tid, reason.encode())

    def _answer_parked(self, parked: list[_Parked]) -> None:
        now = time.monotonic()
        waiting = []
        for p in parked:
            with self._lock:
                item = self._offered.pop(p.tid, None)
            if item is not None:
                header, buffers = item
                if not self._send(p.ident, OK, p.tid, header, buffers):
                    # The client has gone: keep the transfer for the next GET, unless it was
                    # offered again meanwhile.
                    with self._lock:
                        if not self._closed:
                            self._offered.setdefault(p.tid, item)
            elif now >= p.deadline:
                self._send(p.ident, ERR, p.tid, f"it was not offered within {p.wait:g} s".encode())
            else:
                waiting.append(p)
        parked[:] = waiting

    def _send(self, ident: bytes, op: bytes, tid: bytes, header: bytes, buffers: Sequence[Any] = ()) -> bool:
        sig = sign(self._key, [MAGIC, op, tid, header, *buffers])
        try:
            frames = [ident, MAGIC, op, tid, sig, header, *buffers]
            self._router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            _log.warning(
                "nbparallel data plane server %s could not answer a client for transfer %s: %s",
                self.endpoint,
                _show(tid),
                e,
            )
            return False
        return True


class Channel:
    """Client side: one DEALER socket connected to one :class:`Server`.

    Not thread-safe, like a zmq socket: use one Channel per thread. ``timeout`` is how long to
    wait for the server's answer to a put, and the extra time a get allows, beyond its own wait,
    for the answer to arrive. After a timeout the channel reconnects, so a late answer cannot be
    mistaken for the answer to the next request.
    """

    def __init__(self, endpoint: str, key: bytes, timeout: float = 30.0):
        self.endpoint = endpoint
        self.timeout = timeout
        self._key = _check_key(key)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._connect()

    def __repr__(self) -> str:
        return f"<Channel to {self.endpoint}>"

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, tid: str, header: bytes, buffers: Sequence[Any]) -> int:
        """Store transfer ``tid`` in the server and wait for its signed acknowledgement.

        Buffers (any contiguous buffer, numpy arrays included) are sent without copying; since
        put returns only once the server has received everything, the caller may reuse them
        afterwards. Returns the number of payload bytes sent (header plus buffers). Raises
        :class:`ChannelError` when the server refuses the transfer or does not answer in time.
        """
        key = _tid_bytes(tid)
        header = bytes(header)
        views = [_raw(b) for b in buffers]
        sig = sign(self._key, [MAGIC, PUT, key, header, *views])
        what = f"put of transfer {tid!r}"
        self._send([MAGIC, PUT, key, sig, header, *views], what)
        op, answer, _ = self._answer(key, self.timeout, what)
        if op == ERR:
            raise ChannelError(f"{self.endpoint} refused the {what}: {answer.decode('utf-8', 'replace')}.")
        if not hmac.compare_digest(answer, sig):
            raise ChannelError(f"{self.endpoint} acknowledged another message than the {what}; put it again.")
        return len(header) + sum(v.nbytes for v in views)

    def get(self, tid: str, timeout: float | None = None) -> tuple[bytes, list[memoryview]]:
        """Fetch transfer ``tid`` from the server, waiting up to ``timeout`` seconds for it to be offered.

        ``timeout`` defaults to the channel's. Returns ``(header, buffers)`` once the answer's
        signature was checked; the buffers are memoryviews of the received frames. Raises
        :class:`ChannelError` when the transfer is not offered in time or the answer is not
        signed with this channel's key.
        """
        key = _tid_bytes(tid)
        wait = self.timeout if timeout is None else float(timeout)
        if not 0 <= wait <= MAX_GET_WAIT:
            raise ValueError(f"timeout must be between 0 and {MAX_GET_WAIT:g} seconds, not {timeout!r}.")
        request = struct.pack(">d", wait) + os.urandom(16)
        sig = sign(self._key, [MAGIC, GET, key, request])
        what = f"get of transfer {tid!r}"
        self._send([MAGIC, GET, key, sig, request], what)
        op, header, buffers = self._answer(key, wait + self.timeout, what)
        if op == ERR:
            raise ChannelError(
                f"the {what} from {self.endpoint} failed: {header.decode('utf-8', 'replace')}; check that "
                "the sender offers this transfer id, or allow a longer timeout."
            )
        return header, buffers

    def close(self) -> None:
        """Close the socket, dropping whatever is unsent; idempotent."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if not self._ctx.closed:
            self._ctx.term()

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise ChannelError(
                f"cannot connect to {self.endpoint!r} ({e}): pass a Server's endpoint, "
                "e.g. 'tcp://127.0.0.1:53211'."
            ) from None
        self._sock = sock

    def _socket(self, what: str) -> zmq.Socket:
        if self._sock is None:
            raise ChannelError(f"the {what} cannot be sent: the channel to {self.endpoint} is closed.")
        return self._sock

    def _send(self, frames: list[Any], what: str) -> None:
        try:
            self._socket(what).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise ChannelError(
                f"the {what} could not be queued for {self.endpoint}: too many unanswered messages; "
                "check that the server is running."
            ) from None

    def _answer(self, key: bytes, wait: float, what: str) -> tuple[bytes, bytes, list[memoryview]]:
        """The server's verified answer to the request for ``key``: ``(op, header, buffers)``."""
        sock = self._socket(what)
        deadline = time.monotonic() + wait
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, math.ceil(left * 1000))):
                    if time.monotonic() < deadline:
                        continue
                    raise ChannelError(
                        f"no answer from {self.endpoint} within {wait:g} s to the {what}: check that the "
                        "server is running and reachable from here, or allow a longer timeout."
                    )
                frames = sock.recv_multipart(copy=False)
                if len(frames) < 5:
                    raise ChannelError(f"the answer from {self.endpoint} to the {what} is malformed.")
                magic, op, tid, sig, header, *buffers = frames
                if not hmac.compare_digest(sign(self._key, [magic, op, tid, header, *buffers]), sig.bytes):
                    raise ChannelError(
                        f"the signature of the answer from {self.endpoint} to the {what} did not match: "
                        "give the Channel the same key as the Server."
                    )
                if magic.bytes != MAGIC or op.bytes not in (OK, ERR):
                    raise ChannelError(f"the answer from {self.endpoint} to the {what} is malformed.")
                if tid.bytes != key:
                    continue  # answer to an earlier, abandoned request
                return op.bytes, header.bytes, [f.buffer for f in buffers]
        except BaseException:
            # Whatever went wrong (timeout, bad answer, Ctrl-C), start afresh so a late answer
            # to this request cannot be read as the answer to the next one.
            self._sock = None
            sock.close(linger=0)
            self._connect()
            raise
