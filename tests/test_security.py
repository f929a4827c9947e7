"""What a local pool exposes: its listening sockets, its files, and what it accepts from the network.

* No process of a local pool (the notebook, the controller and its schedulers, every engine and
  its nanny) listens on anything but loopback, also once the data plane's direct channels run.
  ipyparallel's controller binds 127.0.0.1 for a local cluster by default (``Cluster()`` with no
  ``controller_ip``), which this test pins.
* Files that hold secrets are private: ipyparallel's connection files (they hold the key that
  signs every message), and every shared-memory segment, the notebook's and the engines'
  hand-off segments alike; a segment that is not private, a link, or a name that is not a
  segment's is refused by the engine.
* A message the engine's direct channel cannot verify is refused before anything in it is
  unpickled, with a payload that would leave a mark if it ever were (test_direct.py covers every
  wire-level forgery; test_dataplane.py a forged put with a harmless payload).
"""

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import socket
import stat
from pathlib import Path

import numpy as np
import psutil
import pytest

from nbparallel.dataplane import direct, handoff
from nbparallel.dataplane.server import Server
from nbparallel.dataplane.shm import Segment
from nbparallel import pipeline

LOOPBACK = {"127.0.0.1", "::1"}


def listening(pid: int, recursive: bool) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every TCP listener and bound UDP socket."""
    proc = psutil.Process(pid)
    out = []
    for p in [proc, *(proc.children(recursive=True) if recursive else [])]:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if (c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN) or (
                    c.type == socket.SOCK_DGRAM and c.laddr):
                out.append((p.pid, " ".join(p.cmdline()[1:3]), c.laddr.ip, c.laddr.port))
    return out


def exposed(sockets: list[tuple[int, str, str, int]]) -> list[tuple[int, str, str, int]]:
    return [s for s in sockets if s[2] not in LOOPBACK
            and not (ipaddress.ip_address(s[2].split("%")[0]).is_loopback)]


def pool_processes(pool) -> dict[str, tuple[int, bool]]:
    """Name -> (pid, include its children) for every process of a started pool."""
    procs = {"notebook": (os.getpid(), False)}
    controller = pool.pool.cluster.controller
    procs["controller"] = (controller.process.pid, True)  # and its scheduler processes
    for e in pool.ids:
        procs[f"engine {e}"] = (pool.info(e)["pid"], True)  # and its nanny
    return procs


@pytest.mark.cluster
def test_no_process_of_a_local_pool_listens_beyond_loopback(pool):
    endpoints = {e: pool.plane.endpoint(e) for e in pool.ids}  # start every direct channel
    assert pool.pool.cluster.controller_ip in ("", "127.0.0.1", "localhost")
    found = {name: listening(pid, children) for name, (pid, children) in pool_processes(pool).items()}
    # The check sees what it must: the controller's sockets and each engine's direct channel.
    assert found["controller"]
    for e, endpoint in endpoints.items():
        tcp = direct.addresses_of(endpoint)[-1]
        port = int(tcp.rsplit(":", 1)[1])
        assert tcp.startswith("tcp://127.0.0.1:")
        assert port in {s[3] for s in found[f"engine {e}"]}, (e, endpoint, found[f"engine {e}"])
    offenders = {name: exposed(sockets) for name, sockets in found.items() if exposed(sockets)}
    assert offenders == {}, offenders


def test_the_check_sees_a_wildcard_listener():
    """The check above can fail: a server bound to every interface is reported."""
    key = os.urandom(32)
    with Server(key, "0.0.0.0") as server:
        port = int(direct.addresses_of(server.endpoint)[-1].rsplit(":", 1)[1])
        hits = exposed(listening(os.getpid(), recursive=False))
        assert ("0.0.0.0", port) in {(s[2], s[3]) for s in hits}
    assert port not in {s[3] for s in listening(os.getpid(), recursive=False)}


@pytest.mark.cluster
def test_connection_files_with_the_key_are_private(pool):
    security = Path(pool.pool.cluster.profile_dir) / "security"
    assert stat.S_IMODE(security.stat().st_mode) & 0o077 == 0
    with_key = []
    for path in security.glob("*.json"):
        info = json.loads(path.read_text())
        if "key" in info:
            with_key.append(path.name)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert info["interface"] == "tcp://127.0.0.1", path
    assert any(name.endswith("-client.json") for name in with_key)
    assert any(name.endswith("-engine.json") for name in with_key)


@pytest.mark.cluster
def test_engines_hand_off_segments_are_private_and_named_after_the_pool(pool):
    from nbparallel.dataplane.transports.shm import outbox_segments

    pool.pipeline.clear()
    wide = "def forward(x, ctx):\n    return np.repeat(x, 50_000, axis=1)"  # 3.2 MB activations
    pipeline.stage("wide", wide, engine=0, namespace={"np": np}, pool=pool)
    pipeline.stage("sum", "def forward(x, ctx):\n    return x.sum(axis=1)", engine=1, pool=pool)
    try:
        y = pipeline.run(np.ones((8, 1)), 2, pool=pool)
        np.testing.assert_array_equal(y, np.full(8, 50_000.0))
        names = pool.pool.apply(0, outbox_segments).get()
        assert names
        owner = pool.plane.arena.owner
        for name in names:
            assert name.startswith(f"nbp-{owner}-")
            path = Path("/dev/shm") / name
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
            assert path.stat().st_uid == os.getuid()
    finally:
        pool.pipeline.clear()


def test_an_engine_maps_only_private_segments_by_their_own_name(tmp_path):
    seg = Segment.create(4096)
    path = Path("/dev/shm") / seg.name
    link = Path("/dev/shm") / f"nbp-{os.getpid()}-link-{os.urandom(8).hex()}"
    try:
        Segment.attach(seg.name, 4096).close()  # the private one opens
        os.chmod(path, 0o644)
        with pytest.raises(PermissionError, match="not private"):
            Segment.attach(seg.name, 4096)
        os.chmod(path, 0o600)
        link.symlink_to(path)
        with pytest.raises(OSError):  # O_NOFOLLOW: a link is never followed
            Segment.attach(link.name, 4096)
        for name in ("../" + seg.name, "passwd", f"nbp-{os.getpid()}/../x", ""):
            with pytest.raises(ValueError, match="not an nbparallel segment"):
                Segment.attach(name, 4096)
    finally:
        link.unlink(missing_ok=True)
        seg.unlink()
        seg.close()


class _Mark:
    """Unpickling this creates a file: proof that a payload was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.cluster
@pytest.mark.parametrize("kind", ["parcel", "hand-off"])
def test_a_forged_message_is_refused_before_anything_is_unpickled(pool, tmp_path, kind):
    import zmq

    from nbparallel.dataplane.remote import channel_stats

    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Mark(str(marker)))
    header = handoff.MARK + evil if kind == "hand-off" else evil
    endpoint = pool.plane.endpoint(1)
    before = pool.pool.apply(1, channel_stats).get()
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(direct.choose(endpoint))  # a process of this user may open the socket
        # Signed with a key of our own: what someone without the cluster's key can do.
        tid = b"run:a:1:0"
        sig = direct.sign(os.urandom(32), [direct.MAGIC, direct.PUT, tid, b"", header, evil])
        sock.send_multipart([direct.MAGIC, direct.PUT, tid, sig, b"", header, evil])
        assert sock.poll(5000)
        reply = sock.recv_multipart()
        assert reply[1] == direct.ERR and b"signature" in reply[5]
    finally:
        ctx.destroy(linger=0)
    after = pool.pool.apply(1, channel_stats).get()
    assert after["refused"] == before["refused"] + 1
    assert after["pending"] == before["pending"]  # nothing was kept to be taken later
    assert not marker.exists()


def test_forged_messages_are_counted_not_written_into_the_running_cell(ip, pool, capfd):
    """A process without the key flooding an engine's channel (one of this user: no other can
    open the socket) cannot write into the notebook: the refusals are counted (the `refused` column of `%nbp status`), and none reaches the output of
    the cell running on that engine."""
    import threading
    import time

    import zmq

    from nbparallel.magics import _status_table

    endpoint = pool.plane.endpoint(0)
    before = pool.plane.channel_stats()[0]["refused"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(direct.choose(endpoint))

    def forge() -> None:
        time.sleep(0.3)  # while the cell runs
        for i in range(200):
            sock.send_multipart([b"nbp1", b"put", f"forged-{i}".encode(), b"\0" * 32, b"h", b"x"])
            sock.recv_multipart()  # the signed refusal

    flood = threading.Thread(target=forge)
    flood.start()
    try:
        ip.run_cell_magic("scatter", "--engines 0", "import time\ntime.sleep(1.5)")
    finally:
        flood.join(timeout=30)
        sock.close()
        ctx.term()
    out = capfd.readouterr()
    assert "refused" not in out.out + out.err and "forged" not in out.out + out.err
    assert pool.plane.channel_stats()[0]["refused"] == before + 200
    table = _status_table(pool, pool.plane.channel_stats())
    assert table.splitlines()[1].split()[-1] == "refused"
    assert table.splitlines()[3].split()[-1] == str(before + 200)


@pytest.mark.cluster
def test_a_stranger_cannot_make_an_engine_hold_memory(pool, stranger):
    """A peer without the key may reach an engine's TCP port (a user of another host, or of this
    one), but cannot log in: what it sends before that is one frame of at most FRAME_LIMIT bytes
    per connection, for at most HANDSHAKE_S seconds."""
    from nbparallel.dataplane.remote import channel_stats

    tcp = direct.addresses_of(pool.plane.endpoint(0))[-1]
    engine = psutil.Process(pool.info(0)["pid"])
    pending = pool.pool.apply(0, channel_stats).get(timeout=10)["pending"]
    before = engine.memory_info().rss
    slow = [stranger.connect(tcp, claim=direct.FRAME_LIMIT, send=direct.FRAME_LIMIT - 1) for _ in range(32)]
    big = [stranger.connect(tcp, claim=800 << 20, send=8 << 20) for _ in range(8)]
    assert all(stranger.dropped(s, within=2.0) for s in big)
    held = engine.memory_info().rss - before
    print(f"\nengine RSS while 40 strangers are connected: {held / 2**20:+.1f} MiB")
    assert held < 16 << 20, f"the engine holds {held / 2**20:.0f} MiB more for strangers"
    assert all(stranger.dropped(s, within=direct.HANDSHAKE_S + 3.0) for s in slow)
    assert pool.pool.apply(0, channel_stats).get(timeout=10)["pending"] == pending  # nothing kept


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to become another user")
def test_another_user_cannot_open_an_engines_unix_socket(pool):
    import subprocess
    import sys

    path = direct.addresses_of(pool.plane.endpoint(0))[0].removeprefix("ipc://")
    code = (
        "import os, socket\nos.setgid(65534); os.setuid(65534)\n"
        f"s = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({path!r})\n"
        "except PermissionError:\n    print('refused')\nelse:\n    print('connected')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "refused", out.stderr
