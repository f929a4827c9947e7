"""The receiving end of the signed channel: a :class:`Server` in an engine (or any process).

The wire format, the signature and the client (:class:`~nbparallel.dataplane.direct.Channel`)
are in ``direct.py``; this module only receives PUTs, parks GETs until their transfer is offered,
and answers both. It checks every message's signature before anything else, refuses replays,
and never unpickles anything.
"""

from __future__ import annotations

import collections
import hmac
import logging
import math
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from .direct import (_PIECE, ERR, FRAME_LIMIT, GET, HANDSHAKE_S, MAGIC, MAX_GET_WAIT, OK, PUT, STAMP,
                     USER, ZAP_DOMAIN, ChannelError, advertised_host, check_key, endpoint_of, frames_of,
                     parts_of, password, peer_address, raw, shown, sign, tid_bytes)

__all__ = ["Server", "remove_stale_folders"]

_log = logging.getLogger("nbparallel.dataplane")
MAX_SESSIONS = 100_000
#: Private directories of the servers' Unix sockets: ``<tmp>/nbp-ch-<pid>-<random>``.
FOLDER_PREFIX = "nbp-ch-"
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with the final NUL


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost")


def remove_stale_folders() -> None:
    """Remove this user's socket directories whose process has gone: an engine stopped by a
    signal (as ipyparallel stops them) or killed cannot remove its own."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(FOLDER_PREFIX):
            continue
        pid = name[len(FOLDER_PREFIX):].partition("-")[0]
        path = os.path.join(root, name)
        try:
            if pid.isdigit() and os.stat(path).st_uid == os.getuid() and not _running(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@dataclass
class _Parked:
    """A GET waiting for its transfer to be offered."""

    ident: bytes
    tid: bytes
    wait: float
    deadline: float
    limit: int  # the piece size the client takes frames in (0: whole)


class Server:
    """Receives PUTs and serves GETs; lives in an engine (or any process).

    A ROUTER socket bound to ``tcp://host:<free port>``, owned by one background daemon thread;
    the other methods may be called from any thread. ``host`` defaults to loopback, where the
    server also listens on a Unix socket in a private directory (see ``direct.py``); to accept
    other machines pass an address of this machine (an engine uses :func:`~nbparallel.dataplane.addresses.route_address`), or
    ``"0.0.0.0"`` to listen on every interface, in which case :attr:`endpoint` advertises the
    address the hostname resolves to (or ``"0.0.0.0"`` when it does not resolve).
    :meth:`listen` adds another address later. TCP peers log in first (ZeroMQ PLAIN, checked
    here by a ZAP handler) and send frames of at most ``FRAME_LIMIT`` bytes.

    Attributes:
        endpoint: where Channels connect, e.g. ``"ipc:///tmp/nbp-ch-41-x1y2/s,tcp://127.0.0.1:53211#<id>"``.
        refused: how many messages and TCP logins were refused (bad or missing signature or
            password, replay, malformed, a put for a transfer id already waiting to be taken).
    """

    def __init__(self, key: bytes, host: str = "127.0.0.1"):
        self._key = check_key(key)
        self.refused = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._inbox: dict[bytes, tuple[bytes, list[memoryview]]] = {}
        self._offered: dict[bytes, tuple[bytes, list[memoryview]]] = {}
        #: Each channel session's highest request counter: a request must go above it.
        self._sessions: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        #: In every signature, so a message for another server (or this one before a restart)
        #: is refused here.
        self.id = os.urandom(8)
        self._closed = False
        self._stop = False
        self._binds: list[tuple[str, Future[str]]] = []

        self._ctx = zmq.Context()
        self._folder: str | None = None
        try:
            # The context's ZAP handler: ZeroMQ asks it about every TCP login (see _login).
            self._zap = self._ctx.socket(zmq.REP)
            self._zap.setsockopt(zmq.LINGER, 0)
            self._zap.bind("inproc://zeromq.zap.01")
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            # Fail loudly (instead of dropping) when answering a client that has gone away, so
            # an offered transfer is kept for the next GET.
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # Options are fixed per listener when it binds: the Unix socket takes whole frames
            # from anyone who may open it, every TCP listener after it demands a login.
            local = self._bind_unix() if _is_loopback(host) else []
            self._router.plain_server = True
            self._router.zap_domain = ZAP_DOMAIN
            self._router.setsockopt(zmq.MAXMSGSIZE, FRAME_LIMIT)
            self._router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_S * 1000)
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
            self._remove_folder()
            raise ChannelError(
                f"could not listen on {host!r} ({e}): pass an address of this machine, "
                "e.g. 127.0.0.1 or 0.0.0.0."
            ) from None
        self._local = local
        self.endpoint = endpoint_of([*local, f"tcp://{advertised_host(host)}:{port}"], self.id)
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
        key = tid_bytes(tid)
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

    def arrived(self, tid: str, timeout: float = 0.0) -> bool:
        """Whether transfer ``tid`` is here to take, waiting up to ``timeout`` for it; never
        raises, so a caller can look at other things between short waits."""
        key = tid_bytes(tid)
        deadline = time.monotonic() + timeout
        with self._arrived:
            while key not in self._inbox and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(left)
            return key in self._inbox

    def take_first(self, tids: Sequence[str], timeout: float = 0.0
                   ) -> tuple[str, bytes, list[memoryview]] | None:
        """Take whichever of ``tids`` arrives first, waiting up to ``timeout`` seconds:
        ``(tid, header, buffers)``, or None when none came (or the server is closed). For one
        consumer of several senders (a map's engines); never raises."""
        keys = {tid_bytes(t): t for t in tids}
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not self._closed:
                for key, tid in keys.items():
                    if key in self._inbox:
                        return (tid, *self._inbox.pop(key))
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
        return None

    def withdraw(self, tid: str) -> bool:
        """Take back offered transfer ``tid`` if no GET was served it yet: True when it was
        still here (it is now forgotten), False when it had been served (or never offered)."""
        with self._lock:
            return self._offered.pop(tid_bytes(tid), None) is not None

    def offer(self, tid: str, header: bytes, buffers: Sequence[Any]) -> None:
        """Keep ``(header, buffers)`` so that one GET of ``tid`` is answered with them.

        The transfer is forgotten once served; offering the same id again replaces it. The
        buffers are sent without copying, so they must not change until the GET was answered
        (or the transfer discarded).
        """
        key = tid_bytes(tid)
        item = (bytes(header), [raw(b) for b in buffers])
        with self._lock:
            if self._closed:
                raise ChannelError(
                    f"transfer {tid!r} cannot be offered: the server {self.endpoint} is closed."
                )
            self._offered[key] = item
            self._wake()

    def discard(self, tid: str) -> None:
        """Drop transfer ``tid``, offered or received but not taken; unknown ids are ignored."""
        key = tid_bytes(tid)
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
        self._remove_folder()

    # -- the Unix socket ------------------------------------------------------------------

    def _bind_unix(self) -> list[str]:
        """Listen on a Unix socket in a new private directory; returns its address, or nothing
        where a socket path would be too long (the TCP listener serves alone then)."""
        remove_stale_folders()
        self._folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")  # mode 0700
        path = os.path.join(self._folder, "s")
        if len(path.encode()) > MAX_UNIX_PATH:
            self._remove_folder()
            return []
        self._router.bind(f"ipc://{path}")
        return [f"ipc://{path}"]

    def _remove_folder(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

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
        poller.register(self._zap, zmq.POLLIN)
        parked: list[_Parked] = []
        try:
            while not self._stop:
                # Nothing may kill this thread: a bad message must not take the server down.
                try:
                    ready = dict(poller.poll(self._poll_ms(parked)))
                    if self._wake_in in ready:
                        self._drain_wakes()
                        self._bind_requested()
                    if self._zap in ready:
                        self._login()
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
            self._zap.close(linger=0)

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
                local = self._local if _is_loopback(host) else []
                done.set_result(endpoint_of([*local, f"tcp://{advertised_host(host)}:{port}"], self.id))

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
        ident, rest = frames[0].bytes, frames[1:]
        if len(rest) < 6:
            tid = rest[2].bytes if len(rest) > 2 else b""
            reason = f"malformed message ({len(rest)} frames, at least 6 expected)"
            return self._refuse(ident, tid, frames, reason)
        magic, op, tid_frame, sig_frame, pieced, *body = rest
        tid, sig = tid_frame.bytes, sig_frame.bytes
        if not hmac.compare_digest(sign(self._key, [magic, op, tid_frame, self.id, pieced, *body]), sig):
            reason = ("signature did not match (wrong key, an altered message, or one meant for "
                      "another server)")
            return self._refuse(ident, tid, frames, reason)
        if magic.bytes != MAGIC:
            return self._refuse(ident, tid, frames, f"unknown protocol {shown(magic.bytes)}, expected 'nbp3'")
        kind = op.bytes
        if kind not in (PUT, GET):
            return self._refuse(ident, tid, frames, f"unexpected op {shown(kind)}")
        parts = parts_of(pieced.bytes, [f.buffer for f in body])
        if not parts:
            return self._refuse(ident, tid, frames, "malformed pieces")
        header, buffers = bytes(parts[0]), parts[1:]
        stamp = header[:STAMP] if kind == PUT else header[8:8 + STAMP]
        if len(stamp) != STAMP:
            return self._refuse(ident, tid, frames, "malformed request (no stamp)")
        if not self._fresh(stamp):
            return self._refuse(ident, tid, frames, "replay of a message already received")
        if kind == PUT:
            with self._arrived:
                duplicate = tid in self._inbox
                if not duplicate:
                    self._inbox[tid] = (header[STAMP:], buffers)
                    self._arrived.notify_all()
            if duplicate:
                reason = "a transfer with this id is already waiting to be taken"
                return self._refuse(ident, tid, frames, reason)
            self._send(ident, OK, tid, sig)
        else:
            request = self._get_request(header)
            if request is None:
                return self._refuse(ident, tid, frames, "malformed get request")
            wait, limit = request
            parked.append(_Parked(ident, tid, wait, time.monotonic() + wait, limit))

    @staticmethod
    def _get_request(header: bytes) -> tuple[float, int] | None:
        """``(wait, piece size)`` of a get's header: wait, stamp, piece size."""
        if len(header) != 8 + STAMP + _PIECE.size:
            return None
        (wait,) = struct.unpack(">d", header[:8])
        if not 0 <= wait <= MAX_GET_WAIT:  # also rejects NaN
            return None
        return wait, _PIECE.unpack(header[8 + STAMP:])[0]

    def _login(self) -> None:
        """Answer ZeroMQ's questions about TCP logins (the ZAP protocol, RFC 27): only a peer
        that knows this server's password (which takes the cluster's key) gets in."""
        while True:
            try:
                request = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            version, request_id, *fields = request
            ok = (len(fields) == 6 and fields[3] == b"PLAIN" and fields[4] == USER
                  and hmac.compare_digest(fields[5], password(self._key, self.id)))
            if not ok:
                self.refused += 1
                peer = fields[1].decode("ascii", "replace") if len(fields) > 1 else "an unknown peer"
                _log.debug("nbparallel data plane server %s refused a login from %s", self.endpoint, peer)
            self._zap.send_multipart([version, request_id, b"200" if ok else b"400",
                                      b"OK" if ok else b"wrong password", b"", b""])

    def _fresh(self, stamp: bytes) -> bool:
        """Whether ``stamp`` is newer than anything its session sent before (then remember it).

        Only signed requests get here, so only holders of the key add sessions; the oldest of
        more than :data:`MAX_SESSIONS` is forgotten (a channel idle for that many others)."""
        session, counter = stamp[:16], int.from_bytes(stamp[16:], "big")
        if counter <= self._sessions.get(session, 0):
            return False
        self._sessions[session] = counter
        self._sessions.move_to_end(session)
        if len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return True

    def _refuse(self, ident: bytes, tid: bytes, frames: list[zmq.Frame], reason: str) -> None:
        # Counted (``%nbp status`` shows it), and logged at debug level only: a warning would
        # reach the output of the cell running on this engine, so anyone able to connect could
        # write lines into the user's notebook.
        self.refused += 1
        _log.debug(
            "nbparallel data plane server %s refused a message from %s for transfer %s: %s",
            self.endpoint,
            peer_address(frames[-1]),
            shown(tid),
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
                if not self._send(p.ident, OK, p.tid, header, buffers, p.limit):
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

    def _send(self, ident: bytes, op: bytes, tid: bytes, header: bytes, buffers: Sequence[Any] = (),
              limit: int = FRAME_LIMIT) -> bool:
        # Answers other than an offered transfer are short; pieces of FRAME_LIMIT suit any client.
        pieced, frames = frames_of([header, *buffers], limit)
        sig = sign(self._key, [MAGIC, op, tid, self.id, pieced, *frames])
        try:
            self._router.send_multipart([ident, MAGIC, op, tid, sig, pieced, *frames],
                                        flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            _log.warning(
                "nbparallel data plane server %s could not answer a client for transfer %s: %s",
                self.endpoint,
                shown(tid),
                e,
            )
            return False
        return True


