"""Engine-to-engine hand-off of large values through shared memory (pipeline activations).

Between engines of one host, sending an activation's bytes over a signed socket is bound by the
signature (about 0.5 GB/s). Instead the sender writes the value's buffers once into a segment of
its :class:`Outbox` and sends only the segment's name and layout over the signed channel; the
receiver maps the segment and reads the arrays in place. The segment is 0600 and owned by this
user, so its contents need no signature of their own: the signed message says which one to read.

A segment is reused only once the receiver is done with it. Its first byte is a busy flag: the
sender sets it before sending, and the receiver clears it when the last view of the delivery dies
(a weak-reference finalizer on the token every view is built on, as in ``engine/store.py``). So a
warm pipeline moves an activation with one copy, and a stage that keeps its input in ``ctx`` for
the backward pass holds the segment until then.
"""

from __future__ import annotations

import pickle
import time
import weakref
from typing import Any, Sequence

from . import parcel
from .shm import ALIGN, GRAIN, MARGIN, NoRoom, Segment, align, default_budget, free_bytes

__all__ = ["MARK", "THRESHOLD", "Outbox", "is_handoff", "receive", "forget"]

MARK = b"NBP-SHM\0"  # a parcel header is a pickle and starts with b"\x80"; this cannot clash
THRESHOLD = 256 << 10  # below this the signed socket is as fast and needs no segment
FREE, BUSY = 0, 1
IDLE = 60.0  # seconds a free segment is kept for the next value of its size


class Outbox:
    """A sending engine's reusable segments, named after the notebook's arena (``<kernel pid>-<tag>``)
    so that its reaper, and the pool when it stops, find them.

    ``budget`` caps the bytes of all segments together; when it is reached and none is free,
    :meth:`pack` raises :class:`~nbparallel.dataplane.shm.NoRoom` and the caller sends inline.
    A free segment not written for ``idle`` seconds is dropped at the next :meth:`pack`, so the
    sizes of last hour's values do not keep holding ``/dev/shm``.
    """

    def __init__(self, owner: int | str, budget: int | None = None, idle: float = IDLE):
        self.owner = owner
        self.budget = default_budget() // 4 if budget is None else budget
        self.idle = idle
        self.segments: list[Segment] = []
        self._written: dict[str, float] = {}

    def pack(self, header: bytes, buffers: Sequence[pickle.PickleBuffer]) -> bytes:
        """Write ``buffers`` into a free segment; returns the message that points the receiver at it."""
        raws = [parcel.raw(b) for b in buffers]
        spans, end = [], ALIGN  # the first cache line holds the busy flag
        for raw in raws:
            spans.append((end, raw.nbytes))
            end = align(end + raw.nbytes)
        now = time.monotonic()
        for stale in [s for s in self.segments
                      if s.mm[0] == FREE and now - self._written[s.name] > self.idle]:
            self._drop(stale)
        seg = self._free(end)
        self._written[seg.name] = now
        for (offset, n), raw in zip(spans, raws):
            seg.mm[offset:offset + n] = raw
        seg.mm[0] = BUSY
        return MARK + pickle.dumps((seg.name, seg.size, end, spans, header))

    def _free(self, need: int) -> Segment:
        free = [s for s in self.segments if s.mm[0] == FREE and s.size >= need]
        if free:
            return min(free, key=lambda s: s.size)
        size = -(-need // GRAIN) * GRAIN
        # Free segments too small for this value make way for one that fits.
        for seg in sorted((s for s in self.segments if s.mm[0] == FREE), key=lambda s: s.size):
            if self._total() + size <= self.budget:
                break
            self._drop(seg)
        if self._total() + size > self.budget or free_bytes() - size < MARGIN:
            raise NoRoom(f"outbox holds {self._total()} bytes; {size} more exceed its budget")
        seg = Segment.create(size, self.owner)
        self.segments.append(seg)
        return seg

    def _total(self) -> int:
        return sum(s.size for s in self.segments)

    def _drop(self, seg: Segment) -> None:
        self.segments.remove(seg)
        self._written.pop(seg.name, None)
        seg.unlink()
        seg.close()

    def close(self) -> None:
        """Unlink every segment; receivers that still map one keep their views."""
        for seg in list(self.segments):
            self._drop(seg)


def is_handoff(header: bytes) -> bool:
    return bytes(header[:len(MARK)]) == MARK


_mapped: dict[str, Segment] = {}
MAPPED_MAX = 64  # a sender replaces segments now and then; old mappings must not pile up


def receive(header: bytes) -> Any:
    """The value a hand-off message points at, as views of the sender's segment."""
    name, size, end, spans, inner = pickle.loads(bytes(header[len(MARK):]))
    seg = _mapped.get(name)
    if seg is None or seg.size != size:
        seg = _mapped[name] = Segment.attach(name, size)
        while len(_mapped) > MAPPED_MAX:
            _mapped.pop(next(iter(_mapped))).close()  # unmaps once its last view is gone
    base = seg.token(0, end)
    weakref.finalize(base, _release, seg.mm)
    return parcel.loads(inner, [base[offset:offset + n] for offset, n in spans])


def _release(mm: Any) -> None:
    try:
        mm[0] = FREE
    except ValueError:
        pass  # the mapping was closed by forget(); the sender's segment is gone too


def forget() -> None:
    """Unmap every segment received so far (the pool disconnected)."""
    for seg in _mapped.values():
        seg.close()
    _mapped.clear()
