"""How many cores this process may use, and how to share them among the engines it starts."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["THREAD_VARS", "usable_cores", "thread_limits"]


#: The thread pools of the BLAS libraries NumPy may use, and OpenMP's.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota.

    ``os.cpu_count()`` is the whole machine's; in a container (Binder gives 1-2 cores of a big
    node) one engine per machine core would run out of memory.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores or 1, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read: the affinity stands
    return max(1, cores or 1)


def thread_limits(n: int) -> dict[str, str]:
    """Share the cores among the engines: n engines each running a BLAS pool as wide as the
    machine fight for the same cores (a matmul measured 6x slower with 2 engines on 2 cores).
    Variables the user already set are left as they are."""
    per_engine = str(max(1, usable_cores() // n))
    return {var: per_engine for var in THREAD_VARS if var not in os.environ}
