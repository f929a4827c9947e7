"""What travels inside an ipyparallel message when the bytes travel elsewhere.

A payload is a dict of named values. Small values ride in the message itself (:class:`Inline`);
large arrays are written once into a shared-memory segment (:class:`ArraySlot`), other large
objects are pickled with protocol 5 so that their buffers go to the segment out of band
(:class:`Pickled`). These entries are the encoding of the ``shm`` transport's notes
(``transports/shm.py``); :func:`dumps` and :func:`loads` that of the direct channel's messages.

The notebook lays values out (:class:`Layout`); the engine opens them (:func:`open_entry`),
building each array on a token from the engine's half (``remote.py``), so views are tracked.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable, Union

import cloudpickle
import numpy as np

from .shm import Segment, align
from .transport import INLINE_LIMIT

__all__ = ["Inline", "ArraySlot", "BufferSlot", "Pickled", "Entry", "INLINE_LIMIT", "Layout",
           "is_plain_array", "dumps", "loads", "open_entry"]


@dataclass(frozen=True)
class Inline:
    value: Any


@dataclass(frozen=True)
class ArraySlot:
    segment: str
    size: int
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    readonly: bool = False


@dataclass(frozen=True)
class BufferSlot:
    segment: str
    size: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Pickled:
    header: bytes
    buffers: tuple[Union[BufferSlot, bytes], ...]
    readonly: bool = False


Entry = Union[Inline, ArraySlot, Pickled]


def is_plain_array(value: Any) -> bool:
    """An ndarray whose bytes are its whole content (no Python objects inside)."""
    return isinstance(value, np.ndarray) and not value.dtype.hasobject and type(value) is np.ndarray


def dumps(value: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle with large buffers kept out of band (small ones stay in the stream)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < INLINE_LIMIT:
            return True  # true means: keep it in the stream
        buffers.append(buf)
        return False

    return cloudpickle.dumps(value, protocol=5, buffer_callback=out_of_band), buffers


def loads(header: bytes, buffers: list[Any]) -> Any:
    return pickle.loads(header, buffers=buffers)


class Layout:
    """Plans where values go in one segment, then writes them there.

    Two steps so that one segment of the exact total size can be leased between them.
    """

    def __init__(self) -> None:
        self.nbytes = 0
        self._writes: list[tuple[int, Any]] = []  # (offset, array or PickleBuffer)

    def reserve(self, nbytes: int) -> int:
        """Room for ``nbytes`` at an aligned offset, which is returned."""
        offset = self.nbytes
        self.nbytes = align(offset + nbytes)
        return offset

    def add(self, value: Any, readonly: bool = False) -> Callable[[Segment], Entry]:
        """Reserve room for ``value``; returns a function giving its entry once a segment exists."""
        if is_plain_array(value):
            if value.nbytes < INLINE_LIMIT:
                return lambda seg: Inline(value)
            offset = self.reserve(value.nbytes)
            self._writes.append((offset, value))
            # The dtype itself, not its .str: "|V8" would turn a record array into raw bytes.
            return lambda seg: ArraySlot(seg.name, seg.size, offset, value.shape, value.dtype,
                                         readonly)
        header, buffers = dumps(value)
        if not buffers:
            return lambda seg: Inline(value)
        offsets = [self.reserve(buf.raw().nbytes) for buf in buffers]
        self._writes.extend(zip(offsets, buffers))
        sizes = [buf.raw().nbytes for buf in buffers]
        return lambda seg: Pickled(header, tuple(BufferSlot(seg.name, seg.size, o, n)
                                                 for o, n in zip(offsets, sizes)), readonly)

    def write(self, segment: Segment) -> None:
        """Copy every reserved value into ``segment``: the one copy the notebook makes."""
        for offset, value in self._writes:
            if isinstance(value, np.ndarray):
                dest = np.ndarray(value.shape, value.dtype, buffer=segment.mm, offset=offset)
                np.copyto(dest, value, casting="no")
            else:
                raw = value.raw()
                segment.mm[offset:offset + raw.nbytes] = raw
        self._writes.clear()


def open_entry(entry: Entry, token: Callable[[str, int, int, int], np.ndarray]) -> Any:
    """Engine side: the value an entry stands for, as views of shared memory where it lies."""
    if isinstance(entry, Inline):
        return entry.value
    if isinstance(entry, ArraySlot):
        dtype = np.dtype(entry.dtype)
        nbytes = int(np.prod(entry.shape, dtype=np.int64)) * dtype.itemsize
        base = token(entry.segment, entry.size, entry.offset, nbytes)
        arr = base.view(dtype).reshape(entry.shape)
        if entry.readonly:
            arr.flags.writeable = False
        return arr
    if isinstance(entry, Pickled):
        buffers = [b if isinstance(b, bytes) else token(b.segment, b.size, b.offset, b.nbytes)
                   for b in entry.buffers]
        value = loads(entry.header, buffers)
        if entry.readonly and isinstance(value, np.ndarray):
            value.flags.writeable = False
        return value
    raise TypeError(f"not a payload entry: {type(entry).__name__}")
