"""The direct data plane channel: round trips, authentication, replays, timeouts, cleanup.

No cluster: a Server and its clients run in this process, over loopback TCP.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from nbparallel.dataplane.addresses import check_reachable, route_address
from nbparallel.dataplane.direct import Channel, ChannelError, sign, split_endpoint
from nbparallel.dataplane.server import Server

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
MB = 1 << 20

pytestmark = pytest.mark.timeout(5)


@pytest.fixture
def server():
    s = Server(KEY)
    yield s
    s.close()


@pytest.fixture
def channel(server):
    c = Channel(server.endpoint, KEY, timeout=3)
    yield c
    c.close()


@pytest.fixture
def raw(server):
    """A bare DEALER socket connected to the server, to send hand-made messages."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(split_endpoint(server.endpoint)[0])
    yield sock
    sock.close()
    ctx.term()


_sessions = itertools.count(1)


def stamp() -> bytes:
    """A fresh request stamp: a session of its own, counter 1."""
    return next(_sessions).to_bytes(16, "big") + (1).to_bytes(8, "big")


def signed(to: bytes, op: bytes, tid: bytes, header: bytes, *buffers: bytes, key: bytes = KEY,
           stamped: bytes | None = None) -> list[bytes]:
    """A hand-made message for the server whose id is ``to``; a put's header gets a stamp in
    front (``stamped``, or a fresh one), as a Channel's does."""
    if op == b"put":
        header = (stamped or stamp()) + header
    return [b"nbp2", op, tid, sign(key, [b"nbp2", op, tid, to, header, *buffers]), header, *buffers]


def test_sign_frames_lengths_and_accepts_buffers():
    a = np.arange(10, dtype=np.float64)
    assert sign(KEY, [b"ab", a]) == sign(KEY, [memoryview(b"ab"), a.tobytes()])
    # Length prefixes: moving a byte from one part to the next changes the signature.
    assert sign(KEY, [b"ab", b"c"]) != sign(KEY, [b"a", b"bc"])
    assert sign(KEY, [b"x"]) != sign(OTHER_KEY, [b"x"])
    assert len(sign(KEY, [])) == 32


def test_put_take_round_trip(server, channel):
    big = np.random.default_rng(0).random(64 * MB // 8)
    parts = [b"small", bytearray(b"\x00\x01\x02"), b"", big]
    sent = channel.put("t1", b"header-bytes", parts)
    assert sent == len(b"header-bytes") + 5 + 3 + 0 + big.nbytes
    header, buffers = server.take("t1", timeout=3)
    assert header == b"header-bytes"
    assert all(isinstance(b, memoryview) for b in buffers)
    assert [bytes(b) for b in buffers[:3]] == [b"small", b"\x00\x01\x02", b""]
    assert np.array_equal(np.frombuffer(buffers[3], dtype=np.float64), big)
    assert server.pending() == 0


def test_offer_get_round_trip(server, channel):
    arr = np.arange(1000, dtype=np.int32)
    server.offer("o1", b"meta", [arr, b"tail"])
    assert server.pending() == 1
    header, buffers = channel.get("o1", timeout=2)
    assert header == b"meta"
    assert all(isinstance(b, memoryview) for b in buffers)
    assert np.array_equal(np.frombuffer(buffers[0], dtype=np.int32), arr)
    assert bytes(buffers[1]) == b"tail"
    assert server.pending() == 0  # served once, then forgotten


def test_get_before_offer_waits(server, channel):
    timer = threading.Timer(0.2, server.offer, args=("late", b"h", [b"payload"]))
    timer.start()
    start = time.monotonic()
    header, buffers = channel.get("late", timeout=3)
    assert time.monotonic() - start >= 0.15
    assert (header, [bytes(b) for b in buffers]) == (b"h", [b"payload"])
    timer.join()


def test_get_timeout_names_transfer(server, channel):
    with pytest.raises(ChannelError, match="'never-offered'"):
        channel.get("never-offered", timeout=0.3)
    # The channel still works afterwards.
    server.offer("after", b"h", [])
    assert channel.get("after", timeout=1) == (b"h", [])


def test_take_timeout_names_transfer(server):
    start = time.monotonic()
    with pytest.raises(ChannelError, match="'never-put'.*0.2 s"):
        server.take("never-put", timeout=0.2)
    assert time.monotonic() - start < 1


def test_put_to_nothing_times_out():
    with Server(KEY) as s:
        endpoint = s.endpoint  # a port nothing listens on any more
    with Channel(endpoint, KEY, timeout=0.3) as c:
        with pytest.raises(ChannelError, match="no answer.*'lost'"):
            c.put("lost", b"h", [b"x"])


def _refused(server, raw, frames, caplog, tid: bytes = b"evil"):
    before = server.refused
    with caplog.at_level(logging.DEBUG, logger="nbparallel.dataplane"):
        raw.send_multipart(frames)
        reply = raw.recv_multipart()
    assert reply[:3] == [b"nbp2", b"err", tid]
    # The refusal itself is signed, so a client with the right key can trust it.
    assert reply[3] == sign(KEY, [b"nbp2", b"err", tid, server.id, *reply[4:]])
    assert server.refused == before + 1
    # Logged for whoever debugs, but never as a warning: a warning inside an engine lands in the
    # running cell's output, where anyone able to connect could then write lines.
    ours = [r for r in caplog.records if r.name == "nbparallel.dataplane"]
    assert ours and all(r.levelno == logging.DEBUG for r in ours)
    with pytest.raises(ChannelError):
        server.take(tid.decode(), timeout=0.1)
    assert server.pending() == 0
    caplog.clear()
    return reply[4].decode()


def test_refuses_wrong_signature(server, raw, caplog):
    frames = signed(server.id, b"put", b"evil", b"h", b"data")
    frames[3] = bytes(32)
    assert "signature" in _refused(server, raw, frames, caplog)


def test_refuses_altered_payload(server, raw, caplog):
    frames = signed(server.id, b"put", b"evil", b"h", b"data")
    frames[5] = b"DATA"
    assert "signature" in _refused(server, raw, frames, caplog)


def test_refuses_empty_signature(server, raw, caplog):
    frames = signed(server.id, b"put", b"evil", b"h", b"data")
    frames[3] = b""
    assert "signature" in _refused(server, raw, frames, caplog)


def test_refuses_missing_signature(server, raw, caplog):
    assert "malformed" in _refused(server, raw, [b"nbp2", b"put", b"evil"], caplog)


def test_refuses_wrong_key(server, raw, caplog):
    frames = signed(server.id, b"put", b"evil", b"h", b"data", key=OTHER_KEY)
    assert "signature" in _refused(server, raw, frames, caplog)


def test_refuses_replay(server, raw, caplog):
    frames = signed(server.id, b"put", b"evil", b"h", b"data")
    raw.send_multipart(frames)
    assert raw.recv_multipart()[1] == b"ok"
    assert server.take("evil", timeout=1)[0] == b"h"
    assert "replay" in _refused(server, raw, frames, caplog)


def test_refuses_reflected_answer(server, raw, caplog):
    # A signed message the server itself could have sent is not a request.
    assert "unexpected op" in _refused(server, raw, signed(server.id, b"ok", b"evil", b"h"), caplog)


def test_refuses_malformed_get(server, raw, caplog):
    frames = signed(server.id, b"get", b"evil", struct.pack(">d", float("nan")) + stamp())
    assert "malformed" in _refused(server, raw, frames, caplog)


def test_server_survives_garbage(server, channel, raw):
    for frames in ([b""], [b"x"] * 3, [b"nbp1"] * 50):
        raw.send_multipart(frames)
        assert raw.recv_multipart()[1] == b"err"
    assert server.refused == 3
    channel.put("fine", b"h", [b"still working"])
    assert server.take("fine", timeout=1)[0] == b"h"


def test_client_refuses_answer_with_other_key(server):
    with Channel(server.endpoint, OTHER_KEY, timeout=2) as c:
        with pytest.raises(ChannelError, match="signature .* did not match.*same key"):
            c.put("k", b"h", [b"x"])
        with pytest.raises(ChannelError, match="signature .* did not match.*same key"):
            c.get("k", timeout=0.5)
    assert server.pending() == 0


def test_client_refuses_forged_answer():
    # A fake server holding another key answers with a well-formed but wrongly signed message.
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")

    def answer():
        ident, *_ = fake.recv_multipart()
        fake.send_multipart([ident, *signed(b"\0" * 8, b"ok", b"f", b"evil-header", b"evil", key=OTHER_KEY)])

    t = threading.Thread(target=answer)
    t.start()
    try:
        with Channel(f"tcp://127.0.0.1:{port}#{bytes(8).hex()}", KEY, timeout=2) as c:
            with pytest.raises(ChannelError, match="signature .* did not match"):
                c.get("f", timeout=0.5)
    finally:
        t.join()
        fake.close()
        ctx.term()


def test_duplicate_put_is_refused(server, channel):
    channel.put("dup", b"h1", [b"a"])
    with pytest.raises(ChannelError, match="already waiting"):
        channel.put("dup", b"h2", [b"b"])
    assert server.take("dup", timeout=1)[0] == b"h1"


def test_binds_loopback_by_default(server):
    assert server.endpoint.startswith("tcp://127.0.0.1:")
    port = int(server.endpoint.partition("#")[0].rsplit(":", 1)[1])
    listening = [
        c for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
    ]
    mine = [c for c in listening if c.laddr.port == port]
    assert mine and all(c.laddr.ip == "127.0.0.1" for c in mine)


def test_close_is_idempotent_and_stops_thread():
    s = Server(KEY)
    with Channel(s.endpoint, KEY, timeout=2) as c:
        c.put("x", b"h", [b"1"])
        s.offer("y", b"h", [b"2"])
        assert s.pending() == 2
        s.take("x", timeout=1)
        s.discard("y")
        assert s.pending() == 0
    s.close()
    s.close()
    assert not s._thread.is_alive()
    with pytest.raises(ChannelError, match="closed"):
        s.take("x", timeout=0.1)
    with pytest.raises(ChannelError, match="closed"):
        s.offer("z", b"", [])
    c.close()  # a channel too
    with pytest.raises(ChannelError, match="closed"):
        c.put("z", b"", [])


def test_close_wakes_take_and_parked_get():
    s = Server(KEY)
    errors = []

    def take():
        try:
            s.take("t", timeout=3)
        except ChannelError as e:
            errors.append(str(e))

    t = threading.Thread(target=take)
    t.start()
    with Channel(s.endpoint, KEY, timeout=2) as c:
        getter = threading.Thread(target=lambda: errors.append(_get_error(c)))
        getter.start()
        time.sleep(0.2)
        s.close()
        t.join(2)
        getter.join(3)
    assert len(errors) == 2 and all("clos" in e for e in errors)


def _get_error(c: Channel) -> str:
    try:
        c.get("g", timeout=3)
    except ChannelError as e:
        return str(e)
    return "no error"


def test_discard_drops_received(server, channel):
    channel.put("d", b"h", [b"x"])
    assert server.pending() == 1
    server.discard("d")
    assert server.pending() == 0
    server.discard("unknown")  # no error


def test_module_imports_only_stdlib_and_zmq():
    import nbparallel.dataplane.direct as direct

    # Loaded by file with empty stand-ins for its packages, so that nothing but direct.py and
    # the pure errors.py it takes its exception base from is imported.
    errors = Path(direct.__file__).parent.parent / "errors.py"
    code = (
        "import importlib.util, sys, types\n"
        "for name in ('nbparallel', 'nbparallel.dataplane'):\n"
        "    sys.modules[name] = types.ModuleType(name); sys.modules[name].__path__ = []\n"
        "def load(name, path):\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    module = sys.modules[name] = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        f"load('nbparallel.errors', {str(errors)!r})\n"
        f"load('nbparallel.dataplane.direct', {direct.__file__!r})\n"
        "print(sorted(m for m in ('ipyparallel', 'numpy', 'ipywidgets') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_throughput_256mb(server, channel):
    data = np.ones(256 * MB, dtype=np.uint8)
    start = time.perf_counter()
    channel.put("big", b"h", [data])
    _, (buf,) = server.take("big", timeout=4)
    elapsed = time.perf_counter() - start
    assert buf.nbytes == data.nbytes
    print(f"\n256 MB put+take over loopback: {elapsed:.3f} s, {data.nbytes / MB / elapsed:.0f} MB/s")


def test_offer_kept_when_client_left(server, raw, channel):
    # A GET whose client disconnected before the offer must not swallow the transfer.
    raw.send_multipart(signed(server.id, b"get", b"gone", struct.pack(">d", 2.0) + stamp()))
    time.sleep(0.1)
    raw.close()
    time.sleep(0.2)
    server.offer("gone", b"h", [b"kept"])
    header, buffers = channel.get("gone", timeout=1)
    assert (header, [bytes(b) for b in buffers]) == (b"h", [b"kept"])
    assert server.pending() == 0


def test_concurrent_channels(server):
    def send(i):
        with Channel(server.endpoint, KEY, timeout=3) as c:
            for j in range(20):
                c.put(f"c{i}-{j}", str(j).encode(), [bytes([i]) * 1000])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for j in range(20):
            header, (buf,) = server.take(f"c{i}-{j}", timeout=1)
            assert header == str(j).encode() and bytes(buf) == bytes([i]) * 1000
    assert server.pending() == 0 and server.refused == 0


def test_refusal_log_names_peer_not_payload(server, raw, caplog):
    with caplog.at_level(logging.DEBUG, logger="nbparallel.dataplane"):
        raw.send_multipart(signed(server.id, b"put", b"evil", b"h", b"secret-payload", key=OTHER_KEY))
        raw.recv_multipart()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "127.0.0.1" in text and "'evil'" in text and "secret-payload" not in text


def test_listen_adds_an_address_sharing_the_transfers(server):
    # Loopback is 127.0.0.0/8 on Linux: a second address of this machine without a network.
    other = server.listen("127.0.0.2")
    assert other.startswith("tcp://127.0.0.2:") and other != server.endpoint
    with Channel(other, KEY, timeout=3) as c2, Channel(server.endpoint, KEY, timeout=3) as c1:
        c2.put("via-second", b"h2", [b"two"])
        c1.put("via-first", b"h1", [b"one"])
        assert bytes(server.take("via-second")[1][0]) == b"two"
        assert bytes(server.take("via-first")[1][0]) == b"one"
    with pytest.raises(ChannelError, match="could not listen on '10.255.255.254'"):
        server.listen("10.255.255.254")  # not an address of this machine


def test_listen_after_close_is_refused():
    s = Server(KEY)
    s.close()
    with pytest.raises(ChannelError, match="closed"):
        s.listen("127.0.0.2")


def test_route_address_is_the_interface_towards_a_host():
    assert route_address("127.0.0.1") == "127.0.0.1"
    assert route_address("127.0.0.5") == "127.0.0.1"  # the kernel picks loopback's own address


def test_check_reachable_says_which_endpoint_and_how_to_fix(server):
    check_reachable(server.endpoint, "the test server")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ChannelError, match=rf"the next stage at tcp://127\.0\.0\.1:{port} "
                           r"cannot be reached from .*NBPARALLEL_DATAPLANE_IP"):
            check_reachable(f"tcp://127.0.0.1:{port}", "the next stage")


def test_a_message_for_another_server_is_refused(server, raw, caplog):
    # Signed with the right key, but for a server of another engine (or this one before a restart).
    other = Server(KEY)
    try:
        frames = signed(other.id, b"put", b"elsewhere", b"h", b"data")
        assert "meant for another server" in _refused(server, raw, frames, caplog, tid=b"elsewhere")
    finally:
        other.close()


def test_a_replay_is_refused_however_many_messages_came_after(server, raw, caplog):
    session = os.urandom(16)
    first = signed(server.id, b"put", b"first", b"h", b"data", stamped=session + (1).to_bytes(8, "big"))
    raw.send_multipart(first)
    assert raw.recv_multipart()[1] == b"ok"
    server.take("first", timeout=1)
    # Far more than the 10,000 messages the old replay window remembered:
    with Channel(server.endpoint, KEY, timeout=3) as c:
        for i in range(12_000):
            c.put(f"t{i}", b"h", [b""])
            server.take(f"t{i}", timeout=1)
    assert "replay" in _refused(server, raw, first, caplog, tid=b"first")
    # An older counter of the same session is a replay too; a newer one is fine.
    older = signed(server.id, b"put", b"older", b"h", b"x", stamped=session + (1).to_bytes(8, "big"))
    assert "replay" in _refused(server, raw, older, caplog, tid=b"older")
    newer = signed(server.id, b"put", b"newer", b"h", b"x", stamped=session + (2).to_bytes(8, "big"))
    raw.send_multipart(newer)
    assert raw.recv_multipart()[1] == b"ok"
    assert server.take("newer", timeout=1)[0] == b"h"
