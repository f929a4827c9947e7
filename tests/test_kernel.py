"""The "nbparallel" kernel end to end: magics load at start, and no engine outlives its kernel.

Each test starts a real kernel from the installed kernel spec, starts a real cluster inside it,
runs a ``%%pmap`` cell, and then ends the kernel: once politely, once with SIGKILL. Either way the
controller, the engines and everything they spawned must be gone within a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

pytestmark = pytest.mark.cluster

KERNEL_NAME = "nbparallel"
STARTUP_TIMEOUT = 120.0
CELL_TIMEOUT = 180.0
GONE_TIMEOUT = 15.0

PIDS_CODE = """
import json, os
import nbparallel
_pool = nbparallel.current()
print(json.dumps({"kernel": os.getpid(),
                  "engines": [e.pid for e in _pool.status()],
                  "controller": _pool.pool.cluster.controller.pid}))
"""


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A running nbparallel kernel; shut down afterwards if the test left it alive."""
    km, kc = start_new_kernel(kernel_name=KERNEL_NAME, startup_timeout=STARTUP_TIMEOUT,
                              cwd=str(tmp_path))
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def execute(kc: BlockingKernelClient, code: str) -> str:
    """Run ``code`` in the kernel and return what it printed; fail with the kernel's traceback."""
    printed: list[str] = []

    def on_output(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            printed.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=CELL_TIMEOUT, output_hook=on_output)
    content = reply["content"]
    assert content["status"] == "ok", (
        f"kernel cell failed: {content.get('ename')}: {content.get('evalue')}\n"
        + "\n".join(content.get("traceback", []))
    )
    return "".join(printed)


def start_cluster_and_map(kc: BlockingKernelClient) -> dict[str, Any]:
    """Start 2 engines, check a %%pmap against the local result; return the pids to watch."""
    execute(kc, "%nbp start -n 2")
    execute(kc, "%%pmap x in range(10) -> r\nx * x")
    r = json.loads(execute(kc, "import json; print(json.dumps(r))"))
    assert r == [x * x for x in range(10)]
    pids = json.loads(execute(kc, PIDS_CODE).strip().splitlines()[-1])
    assert len(pids["engines"]) == 2
    # 8 MB each way: through shared-memory segments named after the kernel's pid.
    execute(kc, "import numpy as np\nbig = np.ones(1_000_000)")
    execute(kc, "%%scatter big --gather twice\ntwice = big * 2")
    assert execute(kc, "print(float(twice.sum()))").strip() == "2000000.0"
    assert segments_of(pids["kernel"]), "the scatter should have used shared memory"
    return pids


def segments_of(kernel_pid: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"nbp-{kernel_pid}-*"))


def pool_processes(pids: dict[str, Any]) -> list[psutil.Process]:
    """The controller, the engines, everything they spawned, and the kernel's reapers."""
    procs = []
    for pid in [pids["controller"], *pids["engines"]]:
        proc = psutil.Process(pid)
        procs.extend([proc, *proc.children(recursive=True)])
    procs.extend(reapers_of(pids["kernel"]))
    return procs


def reapers_of(kernel_pid: int) -> list[psutil.Process]:
    """Watchdogs started for this kernel (``python -m nbparallel.reaper KERNEL_PID ...``)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "nbparallel.reaper" in cmd and cmd[cmd.index("nbparallel.reaper") + 1:][:1] == [
                str(kernel_pid)]:
            found.append(proc)
    return found


def is_running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (an exited child nobody has reaped yet is as good as dead)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def assert_all_gone(procs: list[psutil.Process], timeout: float = GONE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    left = procs
    while time.monotonic() < deadline:
        left = [p for p in procs if is_running(p)]
        if not left:
            return
        time.sleep(0.25)
    pytest.fail(f"still running {timeout:.0f} s after the kernel ended: "
                f"{', '.join(describe(p) for p in left)}")


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} ({' '.join(proc.cmdline()[:4])})"
    except psutil.Error:
        return str(proc.pid)


def test_clean_shutdown_stops_cluster(kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
    km, kc = kernel
    pids = start_cluster_and_map(kc)
    procs = pool_processes(pids)
    assert len(procs) >= 3, "expected a controller and two engines"
    km.shutdown_kernel(now=False)
    assert_all_gone(procs)
    assert segments_of(pids["kernel"]) == []


def test_killed_kernel_is_reaped(kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
    km, kc = kernel
    pids = start_cluster_and_map(kc)
    procs = pool_processes(pids)
    assert reapers_of(pids["kernel"]), "no nbparallel.reaper watches the kernel"
    os.kill(pids["kernel"], signal.SIGKILL)  # no atexit hook runs: only the reaper can clean up
    assert_all_gone(procs)
    assert segments_of(pids["kernel"]) == []
