"""Moving bytes between processes: one Transport interface, one chooser, one module per transport.

Where things live:

- ``transport.py``: the interface every transport implements (its docstring is the contract),
  the transport names, the :class:`~nbparallel.dataplane.transport.Hop` the chooser reads, and
  the one chooser used by ``%%scatter``, ``%%pmap`` and pipeline stages alike.
- ``transports/``: the transports, one module each (``inline``, ``shm``, ``direct``,
  ``cudaipc``), registered in its ``__init__.py``.
- ``plane.py``: the notebook's half (placement plans, accounting once per placement).
- ``remote.py``: the engine's half (mapped segments, resident shards, stashed results, the
  engine's channel, engine-to-engine sends).
- Mechanisms the transports use: ``shm.py`` (segments, the notebook's arena), ``parcel.py``
  (what rides in a message when the bytes ride elsewhere), ``handoff.py`` (engine outboxes),
  ``direct.py`` (the signed ZeroMQ channel), ``cudaipc.py`` (device slots), ``addresses.py``.
"""

from . import transports  # noqa: F401  (registers the built-in transports with the chooser)

__all__: list[str] = []  # import what you need from its modules
