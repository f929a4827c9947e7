"""Settings that apply to every magic of this session.

``dashboard``: show the live dashboard under a magic that runs longer than half a second
(default on; the environment variable ``NBPARALLEL_DASHBOARD=0`` turns it off for a whole
session, ``--no-dashboard`` for one cell)::

    import nbparallel
    nbparallel.config.dashboard = False
"""

from __future__ import annotations

import os

__all__ = ["dashboard"]

dashboard: bool = os.environ.get("NBPARALLEL_DASHBOARD", "1").strip().lower() not in (
    "0", "false", "no", "off")
