"""``shm``: the bytes go through a 0600 shared-memory segment of this host, written once.

Notebook to engines: every engine's values (and the broadcast ones, written once for all) are
laid out in one segment leased from the notebook's :class:`~nbparallel.dataplane.shm.Arena`;
the note says where each value lies and the engine builds views on it (``parcel.open_entry``).
Engines to the notebook: the engine writes its part straight into a segment the notebook leased
(even into the final joined array, or the joined frame's columns); another part that is not one
array goes into the engine's own hand-off segment, as between engines. Engine to engine: the
sender writes into a segment of its :class:`~nbparallel.dataplane.handoff.Outbox` and sends only
where it is (``handoff.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import handoff, parcel, remote
from ..shm import NoRoom, Segment
from ..transport import HANDOFF_LIMIT, INLINE, INLINE_LIMIT, SHM, Full, Hop, Transport

__all__ = ["SharedMemory", "ShmNote", "ShmDest", "OutboxDest", "FrameDest", "outbox_segments"]


@dataclass(frozen=True)
class ShmNote:
    """Values laid out in ``segment``: one payload entry per name (``parcel.py``)."""

    entries: dict[str, parcel.Entry]
    segment: str | None
    transport: str = SHM
    #: Bytes of the scattered and of the broadcast values that were already in shared memory
    #: (so not copied).
    in_place: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class ShmDest:
    """Write a result array into the notebook's array of ``shape`` at ``offset`` of
    ``segment``, at ``lo`` along ``axis`` (a part alone: the whole array, ``lo`` 0)."""

    segment: str
    size: int
    offset: int
    shape: tuple[int, ...]
    dtype: Any
    axis: int = 0
    lo: int = 0
    transport: str = SHM

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class OutboxDest:
    """Pickle a result that is not one array (a DataFrame, a Table) into the engine's own
    hand-off segment; the reply says where, and the notebook reads its columns in place."""

    owner: str
    transport: str = SHM

    @staticmethod
    def carried(inline: Any) -> str:
        """What carried the part: this segment, or (no room, or small) the reply itself."""
        return SHM if isinstance(inline, bytes) and handoff.is_handoff(inline) else INLINE


@dataclass(frozen=True)
class FrameDest:
    """Write a DataFrame part's columns (and index values, unless ``index`` is None) at row
    ``lo`` of the joined frame's column arrays, each ``rows`` long, at ``offsets`` of ``segment``."""

    segment: str
    size: int
    offsets: tuple[int, ...]
    dtypes: tuple[Any, ...]
    rows: int
    lo: int
    index: tuple[int, Any] | None  # (offset, dtype) of the index values
    transport: str = SHM

    def column(self, tok: Any, i: int) -> np.ndarray:
        """Column ``i`` of the joined frame, as a view of the segment token ``tok``."""
        return _view(tok, self.offsets[i], self.rows, self.dtypes[i])

    def index_values(self, tok: Any) -> np.ndarray:
        """The joined frame's index values (when ``index`` is not None), a view of ``tok``."""
        offset, dtype = self.index
        return _view(tok, offset, self.rows, dtype)


def _view(tok: Any, offset: int, rows: int, dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    return tok[offset:offset + rows * dtype.itemsize].view(dtype)


_outbox: handoff.Outbox | None = None  # an engine's own hand-off segments, for the stages


class SharedMemory(Transport):
    name = SHM
    rank = 10

    def __init__(self, link: Any):
        super().__init__(link)
        self._leased: dict[str, Segment] = {}

    @staticmethod
    def reaches(hop: Hop) -> bool:
        return hop.local

    @classmethod
    def suits(cls, hop: Hop) -> bool:
        return hop.local and hop.nbytes >= (HANDOFF_LIMIT if hop.between_engines else INLINE_LIMIT)

    @classmethod
    def why_not(cls, engine: int) -> str:
        return (f"--transport shm needs engines on this host sharing its /dev/shm, but engine "
                f"{engine} does not. Use --transport direct (or leave the default, auto).")

    # -- notebook to engines -----------------------------------------------------------------
    def place(self, engines: Sequence[int], parcels: Sequence[dict[str, Any]],
              shared: dict[str, Any]) -> list[ShmNote]:
        layout = parcel.Layout(self.link.arena.locate)
        makers, in_place = [], []
        for values in parcels:
            before = layout.in_place
            makers.append({n: layout.add(v) for n, v in values.items()})
            in_place.append(layout.in_place - before)
        before = layout.in_place
        shared_makers = {n: layout.add(v, readonly=True) for n, v in shared.items()}
        shared_in_place = layout.in_place - before
        seg = None
        if layout.nbytes:
            try:
                seg = self.link.arena.lease(layout.nbytes)
            except NoRoom as exc:
                raise Full(str(exc)) from None
            self._leased[seg.name] = seg
            layout.write(seg)
        return [ShmNote({**{n: make(seg) for n, make in mine.items()},
                         **{n: make(seg) for n, make in shared_makers.items()}},
                        seg.name if seg else None, in_place=(here, shared_in_place))
                for mine, here in zip(makers, in_place)]

    def lease(self, nbytes: int) -> Segment:
        """A segment of the notebook's arena for results, released with :meth:`release`."""
        try:
            seg = self.link.arena.lease(nbytes)
        except NoRoom as exc:
            raise Full(str(exc)) from None
        self._leased[seg.name] = seg
        return seg

    def release(self, notes: Sequence[Any]) -> None:
        for name in {n.segment for n in notes if n is not None and n.segment}:
            seg = self._leased.pop(name, None)
            if seg is not None:
                self.link.arena.release(seg)

    @staticmethod
    def open(note: ShmNote) -> dict[str, Any]:
        return {name: parcel.open_entry(entry, remote.token)
                for name, entry in note.entries.items()}

    # -- engines to the notebook -------------------------------------------------------------
    @staticmethod
    def deliver(dest: ShmDest | OutboxDest | FrameDest, value: Any) -> Any:
        if isinstance(dest, FrameDest):
            tok = remote.token(dest.segment, dest.size, 0, dest.size)
            n = len(value)
            for i in range(value.shape[1]):
                dest.column(tok, i)[dest.lo:dest.lo + n] = value.iloc[:, i].to_numpy()
            if dest.index is not None:
                dest.index_values(tok)[dest.lo:dest.lo + n] = value.index.to_numpy()
            return None
        if isinstance(dest, OutboxDest):
            try:
                note, _, _ = SharedMemory.pack(value, dest.owner)
            except Full:
                return value  # small, or every segment is still being read: in the reply
            return note
        final = remote.token(dest.segment, dest.size, dest.offset, dest.nbytes)
        final = final.view(np.dtype(dest.dtype)).reshape(dest.shape)
        index = (slice(None),) * dest.axis + (slice(dest.lo, dest.lo + value.shape[dest.axis]),)
        final[index] = value
        return None

    def fetch(self, engine: int, dest: ShmDest | OutboxDest, inline: Any) -> Any:
        if isinstance(dest, OutboxDest):
            return handoff.receive(inline) if dest.carried(inline) == SHM else inline
        seg = self._leased[dest.segment]
        tok = seg.token(dest.offset, dest.nbytes)
        # The segment is free again once the caller drops every view of this part.
        self.link.arena.lend(seg, tok)
        return tok.view(np.dtype(dest.dtype)).reshape(dest.shape)

    # -- engine to engine ----------------------------------------------------------------------
    @staticmethod
    def pack(value: Any, owner: str | None) -> tuple[bytes, list[Any], int]:
        global _outbox
        if owner is None:
            raise Full("the engines do not share this host's /dev/shm")
        header, buffers = parcel.dumps(value)
        nbytes = sum(map(parcel.buffer_nbytes, buffers))
        if nbytes < HANDOFF_LIMIT:
            raise Full("too small to be worth a segment")
        if _outbox is None or _outbox.owner != owner:
            SharedMemory.reset()
            _outbox = handoff.Outbox(owner)
        try:
            note = _outbox.pack(header, buffers)
        except NoRoom as exc:
            raise Full(str(exc)) from None  # every segment is still being read
        return note, [], len(header) + nbytes

    @staticmethod
    def unpack(header: bytes, frames: list[Any]) -> Any:
        return handoff.receive(header)

    @staticmethod
    def reset() -> None:
        global _outbox
        if _outbox is not None:
            _outbox.close()
            _outbox = None
        handoff.forget()


def outbox_segments() -> list[str]:
    """Names of this engine's hand-off segments (to check that a warm pipeline reuses them)."""
    return [seg.name for seg in _outbox.segments] if _outbox is not None else []
