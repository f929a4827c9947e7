"""The direct data plane channel: round trips, authentication, replays, timeouts, cleanup.

No cluster: a Server and its clients run in this process, over its Unix socket and loopback TCP.
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
from nbparallel.dataplane import direct
from nbparallel.dataplane.direct import FRAME_LIMIT, Channel, ChannelError, choose, sign, split_endpoint
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
    """A bare DEALER socket connected to the server's Unix socket, to send hand-made messages
    (as a process of the same user can, key or not)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(choose(server.endpoint))
    yield sock
    sock.close()
    ctx.term()


def logged_in(server, password: bytes | None = None) -> zmq.Socket:
    """A bare DEALER socket on the server's TCP address, logged in with ``password`` (by default
    the right one: a peer with the key)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.plain_username = direct.USER
    sock.plain_password = password or direct.password(KEY, server.id)
    sock.connect(direct.addresses_of(server.endpoint)[-1])
    return sock


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
    return [b"nbp3", op, tid, sign(key, [b"nbp3", op, tid, to, b"", header, *buffers]), b"", header, *buffers]


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
    assert reply[:3] == [b"nbp3", b"err", tid]
    # The refusal itself is signed, so a client with the right key can trust it.
    assert reply[3] == sign(KEY, [b"nbp3", b"err", tid, server.id, *reply[4:]])
    assert server.refused == before + 1
    # Logged for whoever debugs, but never as a warning: a warning inside an engine lands in the
    # running cell's output, where anyone able to connect could then write lines.
    ours = [r for r in caplog.records if r.name == "nbparallel.dataplane"]
    assert ours and all(r.levelno == logging.DEBUG for r in ours)
    with pytest.raises(ChannelError):
        server.take(tid.decode(), timeout=0.1)
    assert server.pending() == 0
    caplog.clear()
    assert reply[4] == b""  # short: not in pieces
    return reply[5].decode()


def test_refuses_wrong_signature(server, raw, caplog):
    frames = signed(server.id, b"put", b"evil", b"h", b"data")
    frames[3] = bytes(32)
    assert "signature" in _refused(server, raw, frames, caplog)


def test_refuses_altered_payload(server, raw, caplog):
    frames = signed(server.id, b"put", b"evil", b"h", b"data")
    frames[6] = b"DATA"
    assert "signature" in _refused(server, raw, frames, caplog)


def test_refuses_empty_signature(server, raw, caplog):
    frames = signed(server.id, b"put", b"evil", b"h", b"data")
    frames[3] = b""
    assert "signature" in _refused(server, raw, frames, caplog)


def test_refuses_missing_signature(server, raw, caplog):
    assert "malformed" in _refused(server, raw, [b"nbp3", b"put", b"evil"], caplog)


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
    frames = signed(server.id, b"get", b"evil", struct.pack(">d", float("nan")) + stamp() + bytes(4))
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
    zap = ctx.socket(zmq.REP)  # lets any login in
    zap.bind("inproc://zeromq.zap.01")
    fake.plain_server = True
    port = fake.bind_to_random_port("tcp://127.0.0.1")

    def answer():
        version, request_id, *_ = zap.recv_multipart()
        zap.send_multipart([version, request_id, b"200", b"OK", b"", b""])
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
        zap.close()
        ctx.term()


def test_duplicate_put_is_refused(server, channel):
    channel.put("dup", b"h1", [b"a"])
    with pytest.raises(ChannelError, match="already waiting"):
        channel.put("dup", b"h2", [b"b"])
    assert server.take("dup", timeout=1)[0] == b"h1"


def test_asked_gets_are_collected_later_in_any_order(server, channel):
    # A worker asks for its next input before it computes; the answer waits in the socket.
    channel.ask("a", timeout=2)
    channel.ask("b", timeout=2)
    assert channel.outstanding == 2
    server.offer("b", b"hb", [b"2"])
    server.offer("a", b"ha", [b"1"])
    assert channel.get("a") == (b"ha", [memoryview(b"1")])
    assert channel.get("b")[0] == b"hb"
    assert channel.outstanding == 0 and server.pending() == 0


def test_a_put_not_waited_for_arrives_and_a_refusal_surfaces_at_the_next_waiting_call(
        server, channel):
    data = np.arange(10_000, dtype=np.float64)
    channel.put("r0", b"h", [data], wait=False)
    channel.put("r1", b"h", [b"x"], wait=False)
    assert channel.outstanding == 2
    channel.put("sync", b"h", [])  # answered in order: both puts above have arrived
    assert channel.outstanding == 0
    assert np.array_equal(np.frombuffer(server.take("r0", timeout=1)[1][0]), data)
    channel.put("dup", b"h", [b"a"])
    channel.put("dup", b"h", [b"b"], wait=False)  # refused: one is already waiting
    server.offer("next", b"n", [])
    with pytest.raises(ChannelError, match="refused the put of transfer 'dup'.*already waiting"):
        channel.get("next", timeout=1)


def test_reset_forgets_requests_whose_answers_must_not_arrive(server, channel):
    channel.ask("old", timeout=2)
    channel.reset()
    assert channel.outstanding == 0
    server.offer("old", b"stale", [])  # may go to the old connection, which is gone
    server.offer("new", b"fresh", [])
    assert channel.get("new", timeout=1)[0] == b"fresh"
    channel.put("sync", b"", [])  # every answer the server sent this channel has come in
    assert channel.outstanding == 0 and channel._answers == {}  # the stale one never did


def test_take_first_takes_whichever_arrives_and_withdraw_only_what_was_not_served(server, channel):
    assert server.take_first(["x", "y"], timeout=0.05) is None
    timer = threading.Timer(0.1, channel.put, args=("y", b"hy", [b"1"]))
    timer.start()
    tid, header, buffers = server.take_first(["x", "y"], timeout=2)
    assert (tid, header, bytes(buffers[0])) == ("y", b"hy", b"1")
    timer.join()  # the put's acknowledgement read: the channel is this thread's again
    server.offer("kept", b"k", [])
    server.offer("served", b"s", [])
    channel.get("served", timeout=1)
    assert server.withdraw("kept") is True and server.withdraw("served") is False
    assert server.withdraw("kept") is False and server.pending() == 0


def tcp_only(endpoint: str) -> str:
    """``endpoint`` without its Unix socket: what a client that cannot see the file uses."""
    return direct.endpoint_of(direct.addresses_of(endpoint)[-1:], split_endpoint(endpoint)[1])


def test_binds_loopback_by_default(server):
    ipc, tcp = direct.addresses_of(server.endpoint)
    assert ipc.startswith("ipc://") and tcp.startswith("tcp://127.0.0.1:")
    port = int(tcp.rsplit(":", 1)[1])
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
    raw.send_multipart(signed(server.id, b"get", b"gone", struct.pack(">d", 2.0) + stamp() + bytes(4)))
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


def test_refusal_log_names_peer_not_payload(server, caplog):
    sock = logged_in(server)
    with caplog.at_level(logging.DEBUG, logger="nbparallel.dataplane"):
        sock.send_multipart(signed(server.id, b"put", b"evil", b"h", b"secret-payload", key=OTHER_KEY))
        sock.recv_multipart()
    sock.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "127.0.0.1" in text and "'evil'" in text and "secret-payload" not in text


def test_listen_adds_an_address_sharing_the_transfers(server):
    # Loopback is 127.0.0.0/8 on Linux: a second address of this machine without a network.
    other = tcp_only(server.listen("127.0.0.2"))
    assert other.startswith("tcp://127.0.0.2:") and other != tcp_only(server.endpoint)
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


# -- who may connect -------------------------------------------------------------------------------
def test_the_unix_socket_is_in_a_private_folder_removed_on_close():
    s = Server(KEY)
    path = Path(choose(s.endpoint).removeprefix("ipc://"))
    folder = path.parent
    st = folder.stat()
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.getuid()
    assert len(folder.name) > len("nbp-ch-1-") + 6  # a random part nobody can guess
    s.close()
    assert not folder.exists()


def test_a_folder_left_by_a_killed_process_is_removed_by_the_next_server(tmp_path):
    code = ("import os, sys\nfrom nbparallel.dataplane.server import Server\n"
            "s = Server(b'k' * 32)\nprint(s.endpoint, flush=True)\nos._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    left = Path(direct.addresses_of(out.stdout.strip())[0].removeprefix("ipc://")).parent
    assert left.exists()  # os._exit: nothing could clean up
    Server(KEY).close()
    assert not left.exists()


def test_a_client_that_cannot_see_the_socket_uses_tcp(server):
    gone = direct.endpoint_of(["ipc:///nonexistent/nbp/s", direct.addresses_of(server.endpoint)[-1]],
                              server.id)
    assert choose(gone).startswith("tcp://127.0.0.1:")
    with Channel(gone, KEY, timeout=3) as c:
        c.put("t", b"h", [b"over tcp"])
    assert bytes(server.take("t")[1][0]) == b"over tcp"


def test_tcp_needs_the_login_that_only_the_key_gives(server):
    before = server.refused
    wrong = logged_in(server, password=direct.password(OTHER_KEY, server.id))
    wrong.send_multipart(signed(server.id, b"put", b"w", b"h", b"x"))
    anonymous = zmq.Context.instance().socket(zmq.DEALER)
    anonymous.setsockopt(zmq.LINGER, 0)
    anonymous.connect(direct.addresses_of(server.endpoint)[-1])
    anonymous.send_multipart(signed(server.id, b"put", b"a", b"h", b"x"))
    assert not wrong.poll(1000) and not anonymous.poll(100)
    assert server.pending() == 0
    assert server.refused > before  # the wrong password (a peer without a login is not asked)
    wrong.close()
    anonymous.close()
    right = logged_in(server)
    right.send_multipart(signed(server.id, b"put", b"r", b"h", b"x"))
    assert right.recv_multipart()[1] == b"ok"
    right.close()


def test_a_peer_that_has_not_logged_in_holds_one_small_frame_for_a_few_seconds(monkeypatch, stranger):
    from nbparallel.dataplane import server as server_mod

    monkeypatch.setattr(server_mod, "HANDSHAKE_S", 1)
    s = Server(KEY)
    try:
        tcp = direct.addresses_of(s.endpoint)[-1]
        big = stranger.connect(tcp, claim=800 * MB, send=0)
        assert stranger.dropped(big, within=1.0)  # announced more than FRAME_LIMIT: at once
        slow = stranger.connect(tcp, claim=FRAME_LIMIT, send=FRAME_LIMIT - 1)
        assert not stranger.dropped(slow, within=0.3)
        assert stranger.dropped(slow, within=2.0)  # never finished logging in
        with Channel(s.endpoint, KEY, timeout=3) as c:
            c.put("after", b"h", [b"fine"])
        assert bytes(s.take("after")[1][0]) == b"fine"
    finally:
        s.close()


@pytest.mark.parametrize("size", [0, 1, FRAME_LIMIT - 1, FRAME_LIMIT, FRAME_LIMIT + 1, 3 * FRAME_LIMIT + 5])
def test_transfers_over_tcp_travel_in_pieces_and_arrive_whole(server, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    with Channel(tcp_only(server.endpoint), KEY, timeout=3) as c:
        c.put("p", b"h" * size, [data, b"tail"])
        header, (got, tail) = server.take("p")
        assert header == b"h" * size and bytes(got) == data.tobytes() and bytes(tail) == b"tail"
        server.offer("g", b"m", [data])
        header, (back,) = c.get("g")
        assert header == b"m" and bytes(back) == data.tobytes()


def test_cut_and_join_are_inverse_and_join_refuses_what_cut_cannot_make():
    parts = [b"", b"abc", b"abcd", b"abcdefghij"]
    frames = direct.cut(parts, 4)
    assert max(len(f) for f in frames) <= 4
    assert [bytes(p) for p in direct.join([memoryview(f) for f in frames], 4)] == parts
    assert direct.join([memoryview(b"abcde")], 4) is None  # a frame over the piece size
    assert direct.join([memoryview(b"abcd")], 4) is None  # a part that never ends
