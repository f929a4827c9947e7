"""The built-in transports, one module each; a line below makes one known to the chooser.

See ``dataplane/transport.py`` for the interface they implement and the order ``auto`` tries
them in (each transport's ``rank``).
"""

from ..transport import register as _register
from .cudaipc import CudaIpc
from .direct import Direct
from .inline import Inline
from .shm import SharedMemory

__all__ = ["CudaIpc", "Direct", "Inline", "SharedMemory"]

_register(CudaIpc)
_register(SharedMemory)
_register(Inline)
_register(Direct)
