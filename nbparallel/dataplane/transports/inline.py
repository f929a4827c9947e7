"""``ipp``: values ride inside ipyparallel's own messages, through the controller.

The cheapest way for small values, and the only one for a load-balanced ``%%pmap`` chunk whose
engine is not known when it is placed and that shared memory cannot take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..transport import ANY_ENGINE, INLINE, INLINE_LIMIT, Hop, Transport

__all__ = ["Inline", "InlineNote", "InReply"]


@dataclass(frozen=True)
class InlineNote:
    values: dict[str, Any]
    transport: str = INLINE


@dataclass(frozen=True)
class InReply:
    """A result that comes back in the engine's reply."""

    transport: str = INLINE


class Inline(Transport):
    name = INLINE
    rank = 20

    @staticmethod
    def reaches(hop: Hop) -> bool:
        return not hop.between_engines  # between engines the signed channel is the message

    @classmethod
    def suits(cls, hop: Hop) -> bool:
        return cls.reaches(hop) and (hop.nbytes < INLINE_LIMIT or hop.receiver == ANY_ENGINE)

    def place(self, engines: Sequence[int], parcels: Sequence[dict[str, Any]],
              shared: dict[str, Any]) -> list[InlineNote]:
        return [InlineNote({**values, **shared}) for values in parcels]

    @staticmethod
    def open(note: InlineNote) -> dict[str, Any]:
        return note.values

    @staticmethod
    def deliver(dest: InReply, value: Any) -> Any:
        return value

    def fetch(self, engine: int, dest: InReply, inline: Any) -> Any:
        return inline
