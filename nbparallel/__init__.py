"""nbparallel: parallel and GPU computing from notebook cells, on ipyparallel engines.

Load the magics with ``%load_ext nbparallel`` (the "Python 3 (nbparallel)" kernel does it for you)::

    %%scatter a --gather b
    b = a * 2

Every magic has a Python twin: :func:`scatter`, :func:`pmap`, :func:`start`, :func:`connect`, and
``pipeline.stage`` / ``pipeline.run`` / ``pipeline.train`` (:mod:`nbparallel.pipeline`).
"""

from __future__ import annotations

from typing import Any

from . import config, pipeline
from .errors import (
    ControllerLost,
    NbparallelError,
    PartitionError,
    PmapError,
    PoolError,
    RemoteError,
    RemoteFailure,
    UsageError,
)
from .pmap import pmap
from .pool import Pool
from .resident import Resident
from .scatter import scatter
from .session import Session, connect, current, restart, start, stop
from .shared import asshared, shared

__version__ = "0.1.0"

__all__ = [
    "ControllerLost",
    "NbparallelError",
    "PartitionError",
    "PmapError",
    "Pool",
    "PoolError",
    "RemoteError",
    "RemoteFailure",
    "Resident",
    "Session",
    "UsageError",
    "asshared",
    "config",
    "connect",
    "current",
    "load_ipython_extension",
    "pipeline",
    "pmap",
    "restart",
    "scatter",
    "shared",
    "start",
    "stop",
]


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%scatter``, ``%%pmap`` and ``%nbp`` (called by ``%load_ext nbparallel``)."""
    from .magics import NbparallelMagics

    ipython.register_magics(NbparallelMagics)
