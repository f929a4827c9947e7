"""A watchdog that stops a pool's processes when the kernel that started them is gone.

ipyparallel starts engines in their own sessions and stops them from an ``atexit`` hook, which never
runs when a kernel is killed. This tiny process outlives such a kernel for just long enough to stop
the controller and engines it started, so no engine is orphaned. It exits by itself once the
processes it watches are gone, so a normal ``%nbp stop`` needs nothing from it. It also unlinks the
shared-memory segments the dead kernel left in /dev/shm (``nbp-<kernel pid>-*``); for a pool
connected to an ``ipcluster`` it watches for that alone, and the pool stops it on disconnect.

Run as ``python -m nbparallel.reaper KERNEL_PID PID [PID ...]``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

__all__ = ["alive", "stop_processes", "remove_segments", "watch", "spawn"]

POLL_SECONDS = 0.5
GRACE_SECONDS = 3.0


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: a killed one that nobody has reaped yet (a zombie,
    which ``os.kill(pid, 0)`` still reaches) counts as gone.

    Asked once per magic (is the controller there?): Linux's ``/proc/<pid>/stat`` answers in
    microseconds, a tenth of what building a ``psutil.Process`` costs; psutil elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_processes(pids: list[int], grace: float = GRACE_SECONDS) -> None:
    """Terminate ``pids`` and their children; kill what is left after a grace period.

    A pid that is no longer an ipyparallel process (it ended and the number was reused) is left
    alone.
    """
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if "ipyparallel" not in " ".join(proc.cmdline()):
                continue
            procs.extend([proc, *proc.children(recursive=True)])
        except psutil.Error:
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def remove_segments(kernel_pid: int | str) -> int:
    """Unlink the shared-memory segments a dead kernel left (named ``nbp-<pid>-...``); a longer
    prefix (``<pid>-<tag>``, ``<pid>-<tag>-<comm id>``) removes just those of one pool or comm."""
    removed = 0
    for path in Path("/dev/shm").glob(f"nbp-{kernel_pid}-*"):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _remove_socket_folders() -> None:
    """The stopped engines' channel sockets (each in a folder named after its engine's pid)."""
    try:
        from .dataplane.server import remove_stale_folders
    except Exception:  # the reaper must finish its job whatever fails to import
        return
    remove_stale_folders()


def watch(kernel_pid: int, pids: list[int]) -> None:
    """Block until the kernel dies (then stop ``pids``) or every pid in ``pids`` has ended."""
    while True:
        if not alive(kernel_pid):
            stop_processes(pids)
            remove_segments(kernel_pid)
            _remove_socket_folders()
            return
        if pids and not any(alive(pid) for pid in pids):
            return  # with no pids it watches for the kernel's segments alone, until told to stop
        time.sleep(POLL_SECONDS)


def spawn(kernel_pid: int, pids: list[int]) -> subprocess.Popen:
    """Start a watchdog for ``pids`` in its own session, so Ctrl-C in the kernel does not reach it."""
    return subprocess.Popen(
        [sys.executable, "-m", "nbparallel.reaper", str(kernel_pid), *map(str, pids)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
