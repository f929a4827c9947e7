"""``direct``: the bytes go over the signed ZeroMQ channel of ``dataplane/direct.py``, beside the
controller. The one transport that reaches engines on other hosts; between engines it is also
the control message itself, so small activations and gradients ride on it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import parcel, remote
from ..transport import ANY_ENGINE, DIRECT, Hop, Transport

__all__ = ["Direct", "DirectNote", "DirectDest", "new_dest"]


@dataclass(frozen=True)
class DirectNote:
    """The notebook put the values on the engine's channel under ``tid``; ``readonly`` names
    the broadcast ones (shared by every engine, so the cell may not write to them)."""

    tid: str
    readonly: tuple[str, ...] = ()
    transport: str = DIRECT


@dataclass(frozen=True)
class DirectDest:
    """The engine offers the result on its channel under ``tid``; the notebook gets it."""

    tid: str
    transport: str = DIRECT


def new_dest() -> DirectDest:
    return DirectDest(secrets.token_hex(16))


class Direct(Transport):
    name = DIRECT
    rank = 30

    @staticmethod
    def reaches(hop: Hop) -> bool:
        return hop.receiver != ANY_ENGINE  # a channel leads to one engine, known in advance

    # -- notebook to engines -----------------------------------------------------------------
    def place(self, engines: Sequence[int], parcels: Sequence[dict[str, Any]],
              shared: dict[str, Any]) -> list[DirectNote]:
        notes = []
        for eid, values in zip(engines, parcels):
            tid = secrets.token_hex(16)
            header, buffers = parcel.dumps({**values, **shared})
            self.link.channel(eid).put(tid, header, [parcel.raw(b) for b in buffers])
            notes.append(DirectNote(tid, tuple(shared)))
        return notes

    @staticmethod
    def open(note: DirectNote) -> dict[str, Any]:
        header, frames = remote.server().take(note.tid)
        # zmq frames are read-only; a shard the cell may write to needs its own memory.
        values = parcel.loads(header, [bytearray(f) for f in frames])
        for name in note.readonly:
            if isinstance(values.get(name), np.ndarray):
                values[name].flags.writeable = False
        return values

    # -- engines to the notebook -------------------------------------------------------------
    @staticmethod
    def deliver(dest: DirectDest, value: Any) -> None:
        header, buffers = parcel.dumps(value)
        remote.server().offer(dest.tid, header, [parcel.raw(b) for b in buffers])
        return None

    def fetch(self, engine: int, dest: DirectDest, inline: Any) -> Any:
        header, frames = self.link.channel(engine).get(dest.tid)
        return parcel.loads(header, list(frames))

    # -- engine to engine ----------------------------------------------------------------------
    @staticmethod
    def pack(value: Any, owner: str | None) -> tuple[bytes, list[Any], int]:
        header, buffers = parcel.dumps(value)
        return header, [parcel.raw(b) for b in buffers], 0  # 0: count what the channel sent

    @staticmethod
    def unpack(header: bytes, frames: list[Any]) -> Any:
        return parcel.loads(header, [bytearray(f) for f in frames])
