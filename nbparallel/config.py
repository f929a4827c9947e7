"""Settings that apply to every magic of this session.

``dashboard``: show the live dashboard under a magic that runs longer than half a second
(default on; the environment variable ``NBPARALLEL_DASHBOARD=0`` or ``%nbp dashboard off`` turns
it off for the session, ``--no-dashboard`` for one cell).

``telemetry``: record spans and load samples at all (default on; ``NBPARALLEL_TELEMETRY=0``).
Off, no dashboard shows and ``%nbp trace save`` has nothing to write; transfers are still
counted, since the data plane's accounting depends on them. ``nbparallel bench`` measures its
cost this way.

``cuda_ipc``: pass CuPy arrays between GPU processes of one host by CUDA IPC (default on;
``NBPARALLEL_CUDA_IPC=0`` sends them through host memory, for engines that cannot share device
memory, e.g. in containers that do not share an IPC namespace).

``comm_timeout``: seconds a ``comm`` collective waits for the other ranks before it fails with a
report of who has not arrived (default 60; ``NBPARALLEL_COMM_TIMEOUT``; ``--comm-timeout`` for
one cell)::

    import nbparallel
    nbparallel.config.dashboard = False
"""

from __future__ import annotations

import os

__all__ = ["dashboard", "telemetry", "cuda_ipc", "comm_timeout"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


dashboard: bool = _flag("NBPARALLEL_DASHBOARD")
telemetry: bool = _flag("NBPARALLEL_TELEMETRY")
cuda_ipc: bool = _flag("NBPARALLEL_CUDA_IPC")
comm_timeout: float = float(os.environ.get("NBPARALLEL_COMM_TIMEOUT", "60"))
