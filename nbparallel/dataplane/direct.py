"""An authenticated point-to-point byte channel over ZeroMQ.

Array buffers move between the notebook and the engines (and engine to engine) over this channel
instead of through ipyparallel's controller, which would copy and re-route every byte. A
:class:`~nbparallel.dataplane.server.Server` (``server.py``) lives in the receiving (or serving)
process; a :class:`Channel` (here) connects to it. This module holds the wire format, the
signature, the connection rules and the client.

Endpoints are ``<address>[,<address>...]#<server id>``, tried in order: a server on this host's
loopback offers ``ipc://<private dir>/s`` first (a Unix socket in a 0700 directory, so other
users cannot even connect, and a third faster than TCP) and its ``tcp://127.0.0.1:port``
after it, for a client that cannot see the socket file; a server listening for other hosts
offers ``tcp://host:port``. The server id (64 random bits, new each time a server starts) is
part of every signature, so a message signed for one server is refused by every other,
including the same engine's server after a restart.

Connections. Over TCP a peer must log in before ZeroMQ accepts a single message from it: ZeroMQ's
PLAIN mechanism with the password :func:`password` (an HMAC of the server id under the
cluster's key), checked by the server's ZAP handler. Until then a connection can make the
server hold at most :data:`FRAME_LIMIT` bytes (ZeroMQ drops a peer that announces a bigger
frame) for at most :data:`HANDSHAKE_S` seconds. Since that limit holds for every frame of the
connection, messages over TCP travel in pieces (see ``pieced`` below). The password crosses the
network in the clear: someone who can read the cluster's traffic can log in, but still cannot
forge, alter or replay a message, which the signature guards.

Wire format. Every message, in both directions, is one ZeroMQ multipart message::

    [b"nbp3", op, tid, sig, pieced, header, *buffers]

``op``
    ``b"put"`` (client stores a transfer in the server), ``b"get"`` (client asks for an offered
    transfer), ``b"ok"`` and ``b"err"`` (the server's answers).
``tid``
    The transfer id, UTF-8.
``sig``
    ``sign(key, [b"nbp3", op, tid, server id, pieced, *frames])``: HMAC-SHA256 over every other
    frame and the id of the server the message is for, each preceded by its length, so frames
    can be neither altered nor re-split nor sent to another server.
``pieced``
    Empty when header and buffers are one frame each. Otherwise a piece size ``L`` (4 bytes,
    big-endian): each of header and buffers is sent as its whole ``L``-byte pieces followed by
    the rest (possibly empty), so a frame shorter than ``L`` ends a part.
``header``
    For ``put``: a stamp, then the caller's opaque metadata (e.g. a pickled dtype and shape).
    For ``get``: the time the server should wait for the transfer to be offered, as a
    big-endian float64 of seconds, then a stamp, then the piece size the answer must use
    (4 bytes, 0 for whole frames). The stamp is the channel's session (16 random bytes) and a
    counter (8 bytes, big-endian) that grows with every request of that session: the server
    accepts a session's request only when its counter is above every one it accepted before,
    so a replay is refused however long after (no window). For the ``ok`` answer to a ``put``
    it is the put's signature, which ties the acknowledgement to that one request; for the
    ``ok`` answer to a ``get`` the offered metadata. For ``err`` it is the reason, UTF-8.
``buffers``
    Raw bytes, sent and received without copying (pieces are joined on arrival, one copy).

The server checks the signature (with :func:`hmac.compare_digest`) before it does anything else
with a message. The client checks the signature of every answer. Nothing here ever unpickles
anything: headers are opaque bytes, and callers unpickle them only after :meth:`Server.take` or
:meth:`Channel.get` returned, that is after the signature was checked.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import pickle
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any, Callable

import zmq

from ..errors import TransferError

__all__ = ["ChannelError", "sign", "raw", "tid_bytes", "check_key", "advertised_host", "peer_address",
           "shown", "split_endpoint", "endpoint_of", "addresses_of", "choose", "password", "cut", "join",
           "frames_of", "parts_of", "Channel"]

MAGIC = b"nbp3"
PUT, GET, OK, ERR = b"put", b"get", b"ok", b"err"
#: Bytes of a request's stamp: its channel's session (16) and counter (8).
STAMP = 24
# Longest a parked GET may wait: bounds what one request can hold in the server.
MAX_GET_WAIT = 24 * 3600.0
LOOK = 0.5  # seconds between looks at whether the server's process is still there
#: The largest frame a TCP connection carries, in either direction: all that a peer which has
#: not logged in can make the other side hold per connection.
FRAME_LIMIT = 64 << 10
#: A TCP peer that has not logged in within this many seconds is dropped.
HANDSHAKE_S = 10
ZAP_DOMAIN = b"nbparallel"
USER = b"nbparallel"
_PIECE = struct.Struct(">I")


class ChannelError(TransferError):
    """A transfer was refused, timed out, or hit a closed channel or server."""


def sign(key: bytes, parts: Sequence[Any]) -> bytes:
    """HMAC-SHA256 of ``parts`` under ``key``, each part preceded by its length (8 bytes, big-endian).

    Parts may be bytes, memoryviews, zmq frames or any contiguous buffer (numpy arrays included);
    they are hashed in place, never copied.
    """
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        view = raw(part)
        mac.update(view.nbytes.to_bytes(8, "big"))
        mac.update(view)
    return mac.digest()


def raw(buf: Any) -> memoryview:
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


def split_endpoint(endpoint: str) -> tuple[str, bytes]:
    """``(addresses, server id)`` of ``<address>[,<address>...]#<hex id>``; the addresses are
    comma-separated, best first."""
    address, _, ident = endpoint.partition("#")
    try:
        return address, bytes.fromhex(ident)
    except ValueError:
        raise ChannelError(f"{endpoint!r} is not a data-plane endpoint (tcp://host:port#<id>); "
                           "ask the server for its endpoint.") from None


def endpoint_of(addresses: Sequence[str], ident: bytes) -> str:
    return f"{','.join(addresses)}#{ident.hex()}"


def addresses_of(endpoint: str) -> list[str]:
    """The addresses of ``endpoint``, best first: its Unix socket (if any), then TCP."""
    return split_endpoint(endpoint)[0].split(",")


def choose(endpoint: str) -> str:
    """The address of ``endpoint`` to connect to from here: its Unix socket when this process
    can connect to it (same host and file system, same user), else its TCP address."""
    for address in addresses_of(endpoint):
        if not address.startswith("ipc://"):
            return address
        # A test connection, because ZeroMQ would retry a dead or foreign socket silently.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(address.removeprefix("ipc://"))
            except OSError:
                continue
        return address
    raise ChannelError(f"none of the addresses of {endpoint!r} can be reached from "
                       f"{socket.gethostname()}: ask the server for its endpoint.")


def password(key: bytes, server: bytes) -> bytes:
    """The PLAIN password for TCP connections to the server whose id is ``server``."""
    return hmac.new(key, b"nbparallel-login:" + server, hashlib.sha256).hexdigest().encode()


def cut(parts: Sequence[Any], limit: int) -> list[memoryview]:
    """``parts`` as frames of at most ``limit`` bytes: each part's whole pieces, then its rest
    (possibly empty), so that a frame shorter than ``limit`` ends a part. No copies."""
    frames = []
    for part in parts:
        view = raw(part)
        whole = view.nbytes - view.nbytes % limit
        frames.extend(view[i:i + limit] for i in range(0, whole, limit))
        frames.append(view[whole:])
    return frames


def join(frames: Sequence[memoryview], limit: int) -> list[memoryview] | None:
    """The parts :func:`cut` made, or None when ``frames`` are not such a sequence. A part of
    several pieces is copied into one buffer; a part of one frame is that frame."""
    parts: list[memoryview] = []
    run: list[memoryview] = []
    for frame in frames:
        if frame.nbytes > limit:
            return None
        run.append(frame)
        if frame.nbytes < limit:
            parts.append(run[0] if len(run) == 1 else _glued(run))
            run = []
    return None if run else parts


def _glued(pieces: list[memoryview]) -> memoryview:
    whole = bytearray(sum(p.nbytes for p in pieces))
    out, at = memoryview(whole), 0
    for p in pieces:
        out[at:at + p.nbytes] = p
        at += p.nbytes
    return out


def frames_of(parts: Sequence[Any], limit: int) -> tuple[bytes, list[Any]]:
    """``(pieced, frames)`` for sending ``parts`` where frames may hold at most ``limit`` bytes
    (0: no limit). Parts that all fit go whole."""
    if not limit or all(raw(p).nbytes < limit for p in parts):
        return b"", list(parts)
    return _PIECE.pack(limit), cut(parts, limit)


def parts_of(pieced: bytes, frames: list[memoryview]) -> list[memoryview] | None:
    """The parts a message carried (see :func:`frames_of`), or None when it is malformed."""
    if not pieced:
        return frames
    if len(pieced) != _PIECE.size or not (limit := _PIECE.unpack(pieced)[0]):
        return None
    return join(frames, limit)


def tid_bytes(tid: str) -> bytes:
    if not isinstance(tid, str) or not tid:
        raise ValueError(f"a transfer id must be a non-empty str, not {tid!r}.")
    return tid.encode("utf-8")


def check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("the key must be non-empty bytes, shared by the Server and its Channels.")
    return bytes(key)


def advertised_host(host: str) -> str:
    # A wildcard bind is not an address anyone can connect to: advertise what this machine's
    # hostname resolves to, which is what the other machines of a cluster usually use too.
    if host not in ("0.0.0.0", "*"):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return host


def peer_address(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return "an unknown peer"


def shown(data: bytes, limit: int = 64) -> str:
    # Transfer ids in log lines come from the network: keep them short and printable.
    text = data.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


class Channel:
    """Client side: one DEALER socket connected to one :class:`Server`.

    Not thread-safe, like a zmq socket: use one Channel per thread. ``timeout`` is how long to
    wait for the server's answer to a put, and the extra time a get allows, beyond its own wait,
    for the answer to arrive. After a timeout the channel reconnects, so a late answer cannot be
    mistaken for the answer to the next request.

    Requests may be pipelined: ``put(..., wait=False)`` returns once the message is queued (its
    acknowledgement is checked when a later call reads the socket, and a refusal raises there),
    and :meth:`ask` sends a get whose answer :meth:`get` collects later, so a worker can fetch
    its next input while it computes.
    """

    def __init__(self, endpoint: str, key: bytes, timeout: float = 30.0,
                 gone: Callable[[], str | None] | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        #: Asked twice a second while an answer is awaited: why the server's process can no
        #: longer answer (its engine stopped), or None. A dead engine then fails the wait at
        #: once instead of after the whole timeout.
        self.gone = gone
        self._key = check_key(key)
        self._server = split_endpoint(endpoint)[1]
        self._address = choose(endpoint)
        #: Frames over TCP are at most FRAME_LIMIT bytes; a Unix socket takes them whole.
        self._limit = 0 if self._address.startswith("ipc://") else FRAME_LIMIT
        self._session = os.urandom(16)
        self._counter = 0
        self._unacked: dict[bytes, bytes] = {}  # tid -> signature of a put not waited for
        self._asked: dict[bytes, float] = {}  # tid -> wait of a get sent by ask()
        self._answers: dict[bytes, tuple[bytes, bytes, list[memoryview]]] = {}
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._connect()

    def __repr__(self) -> str:
        return f"<Channel to {self.endpoint}>"

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, tid: str, header: bytes, buffers: Sequence[Any], wait: bool = True) -> int:
        """Store transfer ``tid`` in the server and wait for its signed acknowledgement.

        Buffers (any contiguous buffer, numpy arrays included) are sent without copying; since
        put returns only once the server has received everything, the caller may reuse them
        afterwards. Returns the number of payload bytes sent (header plus buffers). Raises
        :class:`ChannelError` when the server refuses the transfer or does not answer in time.

        With ``wait=False`` it returns once the message is queued: the buffers must then stay
        unchanged until a later waiting call (ZeroMQ holds them, not a copy), which also raises
        if the server refused this put. A waiting call answered means every earlier put of
        this channel arrived: the server answers in order.
        """
        key = tid_bytes(tid)
        header = bytes(header)
        views = [raw(b) for b in buffers]
        pieced, frames = frames_of([self._stamp() + header, *views], self._limit)
        sig = sign(self._key, [MAGIC, PUT, key, self._server, pieced, *frames])
        what = f"put of transfer {tid!r}"
        self._send([MAGIC, PUT, key, sig, pieced, *frames], what)
        if wait:
            op, answer, _ = self._answer(key, self.timeout, what)
            self._check_ack(op, answer, sig, what)
        else:
            self._unacked[key] = sig
        return len(header) + sum(v.nbytes for v in views)

    def _check_ack(self, op: bytes, answer: bytes, sig: bytes, what: str) -> None:
        if op == ERR:
            raise ChannelError(f"{self.endpoint} refused the {what}: {answer.decode('utf-8', 'replace')}.")
        if not hmac.compare_digest(answer, sig):
            raise ChannelError(f"{self.endpoint} acknowledged another message than the {what}; put it again.")

    def ask(self, tid: str, timeout: float | None = None) -> None:
        """Send a get of ``tid`` now (the server may wait ``timeout`` for it to be offered);
        :meth:`get` of the same ``tid`` returns its answer."""
        key = tid_bytes(tid)
        self._asked[key] = self._send_get(key, tid, timeout)

    @property
    def outstanding(self) -> int:
        """Requests sent whose answer has not been read: asked gets, unacknowledged puts."""
        return len(self._asked) + len(self._unacked)

    def get(self, tid: str, timeout: float | None = None) -> tuple[bytes, list[memoryview]]:
        """Fetch transfer ``tid`` from the server, waiting up to ``timeout`` seconds for it to be offered.

        ``timeout`` defaults to the channel's. Returns ``(header, buffers)`` once the answer's
        signature was checked; the buffers are memoryviews of the received frames. Raises
        :class:`ChannelError` when the transfer is not offered in time or the answer is not
        signed with this channel's key.
        """
        key = tid_bytes(tid)
        what = f"get of transfer {tid!r}"
        if key in self._answers:
            self._asked.pop(key, None)
            op, header, buffers = self._answers.pop(key)
        else:
            wait = self._asked[key] if key in self._asked else self._send_get(key, tid, timeout)
            op, header, buffers = self._answer(key, wait + self.timeout, what)
            self._asked.pop(key, None)
        if op == ERR:
            raise ChannelError(
                f"the {what} from {self.endpoint} failed: {header.decode('utf-8', 'replace')}; check that "
                "the sender offers this transfer id, or allow a longer timeout."
            )
        return header, buffers

    def _send_get(self, key: bytes, tid: str, timeout: float | None) -> float:
        wait = self.timeout if timeout is None else float(timeout)
        if not 0 <= wait <= MAX_GET_WAIT:
            raise ValueError(f"timeout must be between 0 and {MAX_GET_WAIT:g} seconds, not {timeout!r}.")
        request = struct.pack(">d", wait) + self._stamp() + _PIECE.pack(self._limit)
        sig = sign(self._key, [MAGIC, GET, key, self._server, b"", request])
        self._send([MAGIC, GET, key, sig, b"", request], f"get of transfer {tid!r}")
        return wait

    def reset(self) -> None:
        """Drop every request still awaiting an answer and start on a fresh connection (a late
        answer to them cannot reach this channel)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._unacked.clear()
        self._asked.clear()
        self._answers.clear()
        self._connect()

    def _stamp(self) -> bytes:
        self._counter += 1
        return self._session + self._counter.to_bytes(8, "big")

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
        if self._limit:
            sock.plain_username = USER
            sock.plain_password = password(self._key, self._server)
            # A stranger listening on the port (the engine has gone) can make us hold no more.
            sock.setsockopt(zmq.MAXMSGSIZE, self._limit)
        try:
            sock.connect(self._address)
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
                if left <= 0 or not sock.poll(max(1, math.ceil(min(left, LOOK) * 1000))):
                    reason = self.gone() if self.gone is not None else None
                    if reason is not None:
                        raise ChannelError(f"the {what} on {self.endpoint} cannot finish: {reason}.")
                    if time.monotonic() < deadline:
                        continue
                    raise ChannelError(
                        f"no answer from {self.endpoint} within {wait:g} s to the {what}: check that the "
                        "server is running and reachable from here, or allow a longer timeout."
                    )
                frames = sock.recv_multipart(copy=False)
                if len(frames) < 6:
                    raise ChannelError(f"the answer from {self.endpoint} to the {what} is malformed.")
                magic, op, tid, sig, pieced, *rest = frames
                if not hmac.compare_digest(sign(self._key, [magic, op, tid, self._server, pieced, *rest]),
                                           sig.bytes):
                    raise ChannelError(
                        f"the signature of the answer from {self.endpoint} to the {what} did not match: "
                        "give the Channel the same key as the Server."
                    )
                parts = parts_of(pieced.bytes, [f.buffer for f in rest])
                if magic.bytes != MAGIC or op.bytes not in (OK, ERR) or not parts:
                    raise ChannelError(f"the answer from {self.endpoint} to the {what} is malformed.")
                answer = op.bytes, bytes(parts[0]), parts[1:]
                if tid.bytes == key:
                    return answer
                if tid.bytes in self._unacked:
                    self._check_ack(*answer[:2], self._unacked.pop(tid.bytes),
                                    f"put of transfer {tid.bytes.decode('utf-8', 'replace')!r}")
                elif tid.bytes in self._asked:
                    self._answers[tid.bytes] = answer  # for the get() that collects it
                # else: the answer to an earlier, abandoned request
        except BaseException:
            # Whatever went wrong (timeout, bad answer, Ctrl-C), start afresh so a late answer
            # to this request cannot be read as the answer to the next one.
            self.reset()
            raise
