"""Shared fixtures: an isolated IPython dir, one real cluster per test run, a real IPython shell."""

from __future__ import annotations

import os
import tempfile

# Before anything imports IPython: every kernel, engine and ipcluster started by the tests uses a
# throwaway IPython dir, never the developer's ~/.ipython.
os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="nbp-ipython-")

import pytest  # noqa: E402

ENGINES = 3  # lets tests compare 1, 2 and 3 engines; the contract tests pin 2 with --engines 0-1


@pytest.fixture(scope="session")
def pool():
    """A real local cluster, started once, current for the magics and the Python API."""
    import nbparallel

    p = nbparallel.start(ENGINES)
    yield p
    nbparallel.stop()


@pytest.fixture(scope="session")
def shell(pool):
    """A real IPython shell with the extension loaded."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbparallel")
    return ip


@pytest.fixture
def ip(shell):
    """The shell with a clean user namespace for each test."""
    shell.reset(new_session=False)
    return shell


class StdoutRecorder:
    """A stand-in for sys.stdout that notes when each write came."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        import time

        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self):
        pass

    def text(self):
        return "".join(t for _, t in self.writes)


@pytest.fixture
def record_stdout(monkeypatch):
    """Call it in the test (pytest's capture resets sys.stdout between setup and call): it puts
    a :class:`StdoutRecorder` in place of sys.stdout; ``monkeypatch.undo()`` puts it back."""
    import sys

    def start() -> StdoutRecorder:
        recorder = StdoutRecorder()
        monkeypatch.setattr(sys, "stdout", recorder)
        return recorder
    return start


@pytest.fixture(scope="session")
def cuda():
    """CuPy with at least one device, or a skip (for tests marked ``gpu``)."""
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver
        pytest.skip(f"CuPy finds no CUDA driver: {exc}")
    if count < 1:
        pytest.skip("CuPy finds no CUDA device")
    return cupy


class Stranger:
    """TCP connections to a data-plane address, opened as a peer without the key can: a ZeroMQ
    greeting for the PLAIN mechanism, then a login frame that announces ``claim`` bytes, of
    which ``send`` are sent."""

    def __init__(self) -> None:
        self.opened: list = []

    def connect(self, address: str, claim: int, send: int):
        import socket

        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=5)
        self.opened.append(sock)
        greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"PLAIN".ljust(20, b"\0") + bytes(32)
        try:
            sock.sendall(greeting + b"\x06" + claim.to_bytes(8, "big") + bytes(send))
        except OSError:
            pass  # dropped while sending: what a server that refuses the frame does
        return sock

    @staticmethod
    def dropped(sock, within: float) -> bool:
        """Whether the peer closed ``sock`` within ``within`` seconds (what it sent is read away)."""
        import time

        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                if not sock.recv(1 << 16):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False


@pytest.fixture
def stranger():
    """A :class:`Stranger`; its connections are closed at the end of the test."""
    s = Stranger()
    yield s
    for sock in s.opened:
        sock.close()
