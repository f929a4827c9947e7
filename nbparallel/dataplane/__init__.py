"""Moving bytes between the notebook and engines: one small interface, several transports.

``plane.DataPlane`` (one per pool) picks a transport per engine: ``shm`` (shared memory on this
host, ``shm.py``), ``direct`` (a signed ZeroMQ channel, ``direct.py``) or ``ipp`` (ipyparallel's
own messages). ``parcel.py`` is what travels in the message when the bytes travel elsewhere.
"""
