"""``ipp``: values ride inside ipyparallel's own messages, through the controller.

The cheapest way for small values, and the only one for a load-balanced ``%%pmap`` chunk whose
engine is not known when it is placed and that shared memory cannot take. The values are
cloudpickled here, not left to ipyparallel's serializer: that one pickles by reference, and
fails on what notebooks are full of (the namedtuples of ``DataFrame.itertuples()``, classes and
lambdas defined in the notebook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cloudpickle

from ...errors import UsageError
from ..parcel import pickled
from ..transport import ANY_ENGINE, INLINE, INLINE_LIMIT, Hop, Transport

__all__ = ["Inline", "InlineNote", "InReply"]


@dataclass(frozen=True)
class InlineNote:
    blob: bytes  # the cloudpickled values
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
        return [InlineNote(_dumps({**values, **shared})) for values in parcels]

    @staticmethod
    def open(note: InlineNote) -> dict[str, Any]:
        return cloudpickle.loads(note.blob)

    @staticmethod
    def deliver(dest: InReply, value: Any) -> Any:
        return value

    def fetch(self, engine: int, dest: InReply, inline: Any) -> Any:
        return inline


def _dumps(values: dict[str, Any]) -> bytes:
    try:
        return pickled(values)
    except Exception as exc:  # a lock, an open socket, a generator: say which value
        for name, value in values.items():
            try:
                cloudpickle.dumps(value)
            except Exception as inner:
                raise UsageError(
                    f"`{name}` cannot be sent to the engines: {type(inner).__name__}: {inner}. "
                    f"Send plain data (numbers, arrays, lists, dicts, dataclasses) or build it "
                    f"inside the cell.") from None
        raise UsageError(f"the values cannot be sent to the engines: {type(exc).__name__}: {exc}.") from None
