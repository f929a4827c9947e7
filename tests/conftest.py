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
