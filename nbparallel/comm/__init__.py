"""Collectives between engines: the ``comm`` object of a cell.

``api.py`` is the object users call (:class:`Comm`); it builds every collective from *rounds*
(``backend.py``), which a backend moves: ``shm.py`` between engines of one host, ``channel.py``
over the signed direct channels between hosts. ``spec.py`` is what the notebook tells the
engines; ``setup.py`` is the notebook's half, which makes it.
"""

from .api import Comm
from .spec import CommSpec, CommStats

__all__ = ["Comm", "CommSpec", "CommStats"]
