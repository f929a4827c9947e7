"""Which address an engine's channel listens on, and whether another process can reach it.

An engine listens where its cluster reaches it: loopback on the notebook's host, otherwise the
interface of its route to the controller (:func:`route_address`); :func:`check_reachable` tells
at once, with the fix, when a peer's endpoint cannot be reached from here.
"""

from __future__ import annotations

import socket

from .direct import ChannelError, choose

__all__ = ["route_address", "check_reachable"]


def route_address(host: str) -> str:
    """The address of this machine's interface that packets to ``host`` leave by.

    No packet is sent: connecting a UDP socket only asks the kernel for the route. An engine uses
    it to listen where its cluster reaches it (the interface towards its controller), rather than
    on every interface or on whatever its hostname resolves to (127.0.1.1 on Debian).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return str(probe.getsockname()[0])


def check_reachable(endpoint: str, what: str, timeout: float = 10.0) -> None:
    """Raise :class:`ChannelError` unless a connection to ``endpoint`` can be opened.

    ZeroMQ connects in the background and would only time out on the first answer; this says
    at once, and why, when a server cannot be reached from here (a firewall, a loopback address
    of another machine).
    """
    try:
        address = choose(endpoint)
        if address.startswith("tcp://"):  # choose() tried a Unix socket itself
            host, _, port = address.removeprefix("tcp://").rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError, ChannelError) as exc:
        raise ChannelError(
            f"{what} at {endpoint} cannot be reached from {socket.gethostname()} ({exc}). Engines "
            f"that exchange data must reach each other: open the port range between their hosts, "
            f"or set NBPARALLEL_DATAPLANE_IP on the engines to an address the others can reach."
        ) from None
