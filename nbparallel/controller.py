"""Notice when a cluster's controller has gone, instead of waiting for it forever.

Everything between the notebook and the engines goes through ipyparallel's controller. When it
stops, requests are queued by ZeroMQ and never answered: a cell would hang until the user gave
up. A :class:`ControllerWatch` answers "is it still there?" cheaply enough to ask once a second
while a magic waits:

- for a controller this kernel started, whether its process is still alive;
- for one it connected to, whether its registration port still accepts a TCP connection. A
  refused connection means nothing listens there any more; a host that stopped answering
  altogether is declared gone after :data:`MISSES` silent probes in a row.

Nothing is sent on the probe connection: ZeroMQ drops a peer that closes before its greeting.
Also here: where a cluster's connection file lies and the flags that name it in the commands we
suggest, and the processes of a controller this kernel started.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import psutil

from .reaper import alive

__all__ = ["ControllerWatch", "controller_pids", "connection_file", "flags", "address_of",
           "is_profile_dir"]

PROBE_TIMEOUT = 1.0
MISSES = 3


class ControllerWatch:
    """Probe a controller at most every ``every`` seconds; :meth:`check` returns why it is gone.

    ``url`` is the controller's registration address (``tcp://host:port``), or None where it
    cannot be probed directly (an SSH tunnel); ``pids`` the controller's own processes when this
    kernel started them. Once gone, it stays gone: a controller that comes back is a new cluster,
    with none of this pool's engines or state.
    """

    def __init__(self, url: str | None, pids: Sequence[int] = (), every: float = 1.0):
        self.url = url
        self.pids = list(pids)
        self.every = every
        self.lost: str | None = None
        self._address = address_of(url)
        self._misses = 0
        self._next = 0.0

    def check(self, force: bool = False, cheap: bool = False) -> str | None:
        """None while the controller is there; otherwise one clause saying what was seen.

        ``cheap`` looks at the processes of a controller this kernel started even if it looked
        less than ``every`` seconds ago (a few microseconds: worth it once per magic); a probe
        over the network still waits its turn unless ``force``.
        """
        now = time.monotonic()
        due = force or now >= self._next or (cheap and bool(self.pids))
        if self.lost is not None or not due:
            return self.lost
        self._next = now + self.every
        if self.pids:
            dead = [pid for pid in self.pids if not alive(pid)]
            if dead:
                self.lost = f"its process (pid {dead[0]}) has exited"
        elif self._address is not None:
            self.lost = self._probe()
        return self.lost

    def _probe(self) -> str | None:
        try:
            socket.create_connection(self._address, timeout=PROBE_TIMEOUT).close()
        except ConnectionRefusedError:
            return f"nothing listens at {self.url} any more"
        except OSError as exc:  # timed out, unreachable: count, a busy network may recover
            self._misses += 1
            if self._misses >= MISSES:
                return f"{self.url} has not answered {MISSES} probes in a row ({exc})"
            return None
        self._misses = 0
        return None


def address_of(url: str | None) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp://host:port`` URL; None for anything that cannot be probed."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        return None  # ipc:// and the like: nothing to probe from here
    return parts.hostname, parts.port


def controller_pids(cluster: Any) -> list[int]:
    """The started controller's pid, then those of the scheduler processes it forked."""
    pid = getattr(getattr(cluster, "controller", None), "pid", -1) or -1
    if pid <= 0:
        return []
    try:
        return [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def is_profile_dir(profile: str | None) -> bool:
    """Whether ``profile`` is a profile's folder (``ipcluster start --profile-dir=...``) rather
    than a profile's name."""
    return bool(profile) and ("/" in profile or profile.startswith(("~", ".")))


def flags(profile: str | None, cluster_id: str | None) -> str:
    """The ``--profile``/``--cluster-id`` flags that name a cluster, for the commands we suggest."""
    named = ""
    if profile:
        named = f" --profile-dir={profile}" if is_profile_dir(profile) else f" --profile={profile}"
    return named + (f" --cluster-id={cluster_id}" if cluster_id else "")


def connection_file(profile: str | None, cluster_id: str | None) -> Path:
    """Where ``ipcluster`` writes the client connection file of the cluster so named; ``profile``
    is a profile's name, or its folder (``ipcluster start --profile-dir=...``)."""
    from IPython.paths import get_ipython_dir

    if is_profile_dir(profile):
        profile_dir = Path(profile).expanduser()
    else:
        profile_dir = Path(get_ipython_dir()) / f"profile_{profile or 'default'}"
    name = f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json"
    return profile_dir / "security" / name
