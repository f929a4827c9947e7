"""``cuda-ipc``: CuPy arrays go device to device between GPU processes of one host.

The mechanism is ``dataplane/cudaipc.py`` (device slots exported once by CUDA IPC handle, a busy
byte in shared memory); this module fits it to the Transport interface. It is chosen, never
forced: a hop of CuPy arrays of at least ``cudaipc.THRESHOLD`` bytes between GPU processes of
this host, while ``nbparallel.config.cuda_ipc`` is on. Whatever it cannot take (full slots, small
arrays) goes through host memory by the next transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ... import config, gpu
from .. import cudaipc
from ..shm import NoRoom
from ..transport import CUDA_IPC, Full, Hop, Transport

__all__ = ["CudaIpc", "DeviceNote"]


@dataclass(frozen=True)
class DeviceNote:
    """Per name, the CUDA IPC message that points at the array's slot."""

    entries: dict[str, bytes]
    transport: str = CUDA_IPC


_outbox: cudaipc.DeviceOutbox | None = None  # an engine's own device slots, for the stages


class CudaIpc(Transport):
    name = CUDA_IPC
    rank = 0
    forceable = False

    def __init__(self, link: Any):
        super().__init__(link)
        self._box: cudaipc.DeviceOutbox | None = None

    @staticmethod
    def reaches(hop: Hop) -> bool:
        return hop.device and hop.gpu and hop.local and config.cuda_ipc

    @classmethod
    def suits(cls, hop: Hop) -> bool:
        return cls.reaches(hop) and hop.nbytes >= cudaipc.THRESHOLD

    # -- notebook to engines -----------------------------------------------------------------
    def place(self, engines: Sequence[int], parcels: Sequence[dict[str, Any]],
              shared: dict[str, Any]) -> list[DeviceNote]:
        cp = gpu.cupy_if_device()
        if cp is None or shared:
            raise Full("no CUDA device in this process" if cp is None else
                       "broadcast values go through the host")
        if self._box is None:
            self._box = cudaipc.DeviceOutbox(cp, self.link.arena.owner)
        notes = []
        for values in parcels:
            entries = {}
            for name, value in values.items():
                entries[name] = _pack(self._box, value)[0]
            notes.append(DeviceNote(entries))
        return notes

    @staticmethod
    def open(note: DeviceNote) -> dict[str, Any]:
        cp = gpu.cupy_if_device()
        return {name: cudaipc.receive(cp, msg) for name, msg in note.entries.items()}

    def close(self) -> None:
        if self._box is not None:
            self._box.close()
            self._box = None

    # -- engine to engine ----------------------------------------------------------------------
    @staticmethod
    def pack(value: Any, owner: str | None) -> tuple[bytes, list[Any], int]:
        global _outbox
        cp = gpu.cupy_if_device()
        if cp is None or owner is None:
            raise Full("not a GPU process of the notebook's host")
        if _outbox is None or _outbox.owner != owner:
            if _outbox is not None:
                _outbox.close()
            _outbox = cudaipc.DeviceOutbox(cp, owner)
        note, nbytes = _pack(_outbox, value)
        return note, [], nbytes

    @staticmethod
    def unpack(header: bytes, frames: list[Any]) -> Any:
        return cudaipc.receive(gpu.cupy_if_device(), header)

    @staticmethod
    def reset() -> None:
        global _outbox
        if _outbox is not None:
            _outbox.close()
            _outbox = None
        cudaipc.forget(gpu.cupy_if_device() if gpu.bound() else None)


def _pack(box: cudaipc.DeviceOutbox, value: Any) -> tuple[bytes, int]:
    try:
        packed = box.pack(value)
    except NoRoom as exc:
        raise Full(str(exc)) from None  # every slot is still being read
    if packed is None:
        raise Full("less than cudaipc.THRESHOLD of device arrays: the host is quicker")
    return packed
