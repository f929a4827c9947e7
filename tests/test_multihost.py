"""A cluster across two hosts: the second one is a network namespace made for the test.

The "peer host" is an engine started with `ip netns exec` in a namespace of its own, reached
over a veth pair (addresses on that link only), with its own hostname and its own /dev/shm, so
to nbparallel it is another machine: the shared-memory probe fails, its bytes go over the signed
direct channel, and its channel must listen where the other host can reach it, and only there.
The controller listens on the host's end of the link; one engine runs on the host, one on the
peer. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2; elsewhere the tests skip, and the
non-shared-memory path is still run end to end by forcing `--transport direct` on local engines
(test_dataplane.py).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nbparallel
from nbparallel import session as pool_mod
from nbparallel import pipeline

pytestmark = pytest.mark.cluster

PEER_NAME = "nbp-peer"
HOST, PEER = 0, 1  # engine ids: the controller's first engine is the host's


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _netns_or_skip(name: str) -> None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("a network namespace needs root, iproute2 and unshare")
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.strip()}")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """(pool, host address, peer address): a pool connected to a two-host cluster."""
    import ipyparallel as ipp

    name = f"nbp{os.getpid() % 100_000}"
    _netns_or_skip(name)
    subnet = f"10.231.{random.randrange(1, 250)}"
    host_ip, peer_ip = f"{subnet}.1", f"{subnet}.2"
    log = tmp_path_factory.mktemp("peer") / "engine.log"
    cluster = peer = pool = None
    try:
        _ip("link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}p")
        _ip("link", "set", f"{name}p", "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", f"{name}h")
        _ip("link", "set", f"{name}h", "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{peer_ip}/30", "dev", f"{name}p")
        _ip("netns", "exec", name, "ip", "link", "set", f"{name}p", "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")

        cluster = ipp.Cluster(n=1, cluster_id=name, controller_ip=host_ip, log_level=40)
        cluster.start_cluster_sync()
        client = cluster.connect_client_sync()
        client.wait_for_engines(1, timeout=120, interactive=False)
        engine_file = Path(cluster.profile_dir, "security", f"ipcontroller-{name}-engine.json")
        # Another machine: its own network, hostname and /dev/shm.
        become_peer = (f"hostname {PEER_NAME} && mount -t tmpfs -o mode=1777,size=256m tmpfs "
                       f"/dev/shm && exec \"$@\"")
        with open(log, "w") as out:
            peer = subprocess.Popen(
                ["ip", "netns", "exec", name, "unshare", "--uts", "--mount", "sh", "-c",
                 become_peer, "sh", sys.executable, "-m", "ipyparallel.engine",
                 f"--file={engine_file}", "--log-level=40"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            client.wait_for_engines(2, timeout=120, interactive=False)
        except Exception:
            pytest.fail(f"the engine in the namespace did not register:\n{log.read_text()}")
        client.close()
        pool = nbparallel.Session(nbparallel.Pool.connect(cluster_id=name, timeout=30, gpus="none"))
        yield pool, host_ip, peer_ip
    finally:
        if pool is not None:
            pool.stop()
        if peer is not None:
            os.killpg(peer.pid, signal.SIGKILL)
            peer.wait(timeout=30)
        if cluster is not None:
            cluster.stop_cluster_sync()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"{name}h"], capture_output=True, timeout=30)


@pytest.fixture
def current(hosts, monkeypatch):
    monkeypatch.setattr(pool_mod, "_current", hosts[0])
    return hosts


def listening(pid: int) -> set[str]:
    """``address:port`` of every TCP socket ``pid`` listens on, read in its own namespace
    (psutil reads the caller's /proc/net, which does not show another namespace's sockets)."""
    fds = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fds.iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr, port = local.split(":")
            raw = bytes.fromhex(addr)
            if family == socket.AF_INET:
                raw = raw[::-1]
            else:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            found.add(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return found


def test_the_peer_is_another_host_to_nbparallel(current):
    pool, _, _ = current
    hosts = {row.id: row.host for row in pool.status()}
    assert hosts == {HOST: socket.gethostname(), PEER: PEER_NAME}
    assert pool.plane.is_local(HOST) and not pool.plane.is_local(PEER)


def test_scatter_across_hosts_moves_the_peers_bytes_over_the_signed_channel(ip, current):
    pool, _, peer_ip = current
    a = np.random.default_rng(0).standard_normal((2_000, 1_000))  # 16 MB
    ip.user_ns["a"] = a
    cursor = pool.transfers.cursor
    ip.run_cell_magic("scatter", "a --gather b --reduce n=sum --no-dashboard",
                      "b = a * 2\nn = len(a)")
    np.testing.assert_array_equal(ip.user_ns["b"], a * 2)
    assert ip.user_ns["n"] == len(a)
    moved = {(t.engine, t.kind, t.transport) for t in pool.transfers.since(cursor)[0]
             if t.kind != "reduce"}  # a reduced number rides in ipyparallel's reply
    assert moved == {(HOST, "scatter", "shm"), (HOST, "gather", "shm"),
                     (PEER, "scatter", "direct"), (PEER, "gather", "direct")}
    assert pool.plane.endpoint(PEER).startswith(f"tcp://{peer_ip}:")


def test_pmap_runs_items_on_both_hosts(ip, current):
    ip.run_cell_magic("pmap", "i in range(40) -> r --no-dashboard",
                      "import socket, time\ntime.sleep(0.05)\n(i, socket.gethostname())")
    r = ip.user_ns["r"]
    assert [i for i, _ in r] == list(range(40))
    assert {h for _, h in r} == {socket.gethostname(), PEER_NAME}


def test_a_pipeline_across_hosts_sends_activations_host_to_host(ip, current):
    pool, host_ip, peer_ip = current
    ip.run_cell_magic("stage", "double --engine 0", "def forward(x, ctx):\n    return x * 2\n")
    ip.run_cell_magic("stage", "inc --engine 1", "def forward(x, ctx):\n    return x + 1\n")
    xs = np.random.default_rng(1).standard_normal((4, 100_000))  # 800 kB a micro-batch
    ip.user_ns["xs"] = xs
    cursor = pool.transfers.cursor
    ip.run_line_magic("pipeline", "run --input xs --microbatches 4 --out ys --no-dashboard")
    np.testing.assert_array_equal(ip.user_ns["ys"], xs * 2 + 1)
    stage = [t for t in pool.transfers.since(cursor)[0] if t.kind == "stage"]
    # Big enough for the shared-memory hand-off between engines of one host; across hosts the
    # activations go over the network, to the peer's address.
    assert {(t.engine, t.peer, t.transport) for t in stage} == {(HOST, PEER, "direct")}
    assert sum(t.nbytes for t in stage) >= xs.nbytes
    pool.pipeline.clear()


def test_training_across_hosts_equals_one_process(current):
    """Four layers alternating between the hosts: every activation and gradient crosses."""
    from test_pipeline import assert_like_one_process, data, define, model

    pool, _, _ = current
    params = model()
    x, t = data()
    define(pool, params, [HOST, PEER, HOST, PEER])
    cursor = pool.transfers.cursor
    losses = pipeline.train(x, t, 4, schedule="interleaved", steps=2, pool=pool)
    assert_like_one_process(pool, params, x, t, losses, 2)
    stage = {(t.engine, t.peer, t.transport) for t in pool.transfers.since(cursor)[0]
             if t.kind == "stage"}
    assert stage == {(HOST, PEER, "direct"), (PEER, HOST, "direct")}
    pool.pipeline.clear()


def test_channels_listen_only_where_the_other_host_reaches_them(current):
    pool, host_ip, peer_ip = current
    allowed = {HOST: {"127.0.0.1", host_ip}, PEER: {"127.0.0.1", peer_ip}}
    for engine in (HOST, PEER):
        addresses = {a.rsplit(":", 1)[0] for a in listening(pool.info(engine)["pid"])}
        assert addresses and addresses <= allowed[engine], (engine, addresses)
    # The peer's data-plane channel is on the link's address, not on every interface.
    assert any(a.startswith(f"{peer_ip}:") for a in listening(pool.info(PEER)["pid"]))


def test_comm_between_hosts_goes_over_the_direct_channels(ip, current):
    pool, _, _ = current
    cursor = pool.transfers.cursor
    ip.run_cell_magic("scatter", "--reduce out=list --no-dashboard", """
import numpy as np, socket
big = np.full(200_000, rank + 1.0)                       # 1.6 MB: reduced block by block
out = (repr(comm), socket.gethostname(),
       comm.allreduce(big)[::50_000].tolist(), comm.alltoall([rank * 10 + j for j in range(size)]),
       comm.halo(np.full((3, 2), float(rank)), 1).tolist())
""")
    (r0, h0, s0, a0, x0), (r1, h1, s1, a1, x1) = ip.user_ns["out"]
    assert "direct" in r0 and "direct" in r1 and (h0, h1) == (socket.gethostname(), PEER_NAME)
    assert s0 == s1 == [3.0] * 4
    assert (a0, a1) == ([0, 10], [1, 11])
    assert x0 == [[0.0, 0.0]] * 3 + [[1.0, 1.0]] and x1 == [[0.0, 0.0]] + [[1.0, 1.0]] * 3
    comm = {(t.engine, t.peer, t.transport) for t in pool.transfers.since(cursor)[0]
            if t.kind == "comm"}
    assert comm == {(HOST, PEER, "direct"), (PEER, HOST, "direct")}
