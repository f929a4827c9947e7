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

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Union

import cloudpickle
import numpy as np

from .shm import Segment, align
from .transport import INLINE_LIMIT

__all__ = ["Inline", "ArraySlot", "BufferSlot", "Pickled", "Entry", "INLINE_LIMIT", "Layout",
           "is_plain_array", "pickled", "dumps", "loads", "raw", "buffer_nbytes", "open_entry"]


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
    #: In a segment the notebook's own array lives in (scattered without a copy): the engine
    #: maps it copy-on-write, so what a cell writes into its shard never reaches the notebook.
    private: bool = False


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


#: Values the standard pickler writes by value all by itself.
_ATOMS = frozenset([int, float, complex, str, bytes, bool, type(None), range])
_PLAIN_WALK = 100_000  # containers' elements looked at before giving up on the fast path


def pickled(value: Any) -> bytes:
    """``value`` pickled: with the standard C pickler when it holds only numbers, strings,
    NumPy scalars and arrays (without objects) in tuples, lists and dicts, else cloudpickle,
    which calls back into Python for every object that is not a built-in one: a chunk of a
    million NumPy scalars (``%%pmap x in array``) pickles in 0.2 s instead of 5 s.

    >>> import pickle, numpy as np
    >>> pickle.loads(pickled([np.float64(2.5), (1, "a")])) == [2.5, (1, "a")]
    True
    """
    if _plain(value, [_PLAIN_WALK]):
        return pickle.dumps(value, protocol=5)
    return cloudpickle.dumps(value)


def _plain(value: Any, budget: list[int]) -> bool:
    stack = [value]
    while stack:
        budget[0] -= 1
        if budget[0] < 0:
            return False
        v = stack.pop()
        t = type(v)
        if t in _ATOMS:
            continue
        if t is tuple or t is list:
            stack.extend(v)
        elif t is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, np.generic) and t.__module__ == "numpy" and not isinstance(v, np.void):
            continue
        elif t is np.ndarray and not v.dtype.hasobject and v.dtype.fields is None and (
                v.nbytes < INLINE_LIMIT
                or v.dtype.kind not in "mM" and (v.flags.c_contiguous or v.flags.f_contiguous)):
            continue  # (a large strided or datetime array needs _Pickler's placeholder)
        else:
            return False
    return True


def dumps(value: Any) -> tuple[bytes, list[Any]]:
    """Pickle with large buffers kept out of band (small ones stay in the stream).

    The buffers are ``PickleBuffer`` objects, or ndarrays where the value holds a large array
    that is not contiguous (a row slice of a pandas block, a strided view) or holds datetimes:
    pickle would copy those into the stream, so they leave it as they are, and the writer lays
    them out contiguously (:meth:`Layout.write`, :func:`raw`) on the way to where they go.
    """
    buffers: list[Any] = []
    strided: dict[int, np.ndarray] = {}

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        arr = strided.pop(id(buf), None)
        if arr is not None:
            buffers.append(arr)
            return False
        if buf.raw().nbytes < INLINE_LIMIT:
            return True  # true means: keep it in the stream
        buffers.append(buf)
        return False

    stream = io.BytesIO()
    if _plain(value, [_PLAIN_WALK]):
        pickle.Pickler(stream, protocol=5, buffer_callback=out_of_band).dump(value)
    else:
        _Pickler(stream, strided, protocol=5, buffer_callback=out_of_band).dump(value)
    return stream.getvalue(), buffers


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, plus: a large array that NumPy would pickle in band leaves the stream as a
    placeholder buffer, and :func:`dumps` hands out the array itself in its place."""

    def __init__(self, file: Any, strided: dict[int, np.ndarray], **kw: Any):
        super().__init__(file, **kw)
        self._strided = strided
        self._markers: list[pickle.PickleBuffer] = []  # alive until the dump ends: ids stay unique

    def reducer_override(self, obj: Any) -> Any:
        # NumPy pickles these in band; datetimes too, however laid out (pandas' datetime columns).
        if (type(obj) is np.ndarray and obj.nbytes >= INLINE_LIMIT and not obj.dtype.hasobject
                and (obj.dtype.kind in "mM"
                     or not (obj.flags.c_contiguous or obj.flags.f_contiguous))):
            # Stands in for the array in the buffer stream; writable, so the array received is.
            marker = pickle.PickleBuffer(bytearray())
            self._strided[id(marker)] = obj
            self._markers.append(marker)
            return _from_buffer, (marker, obj.shape, obj.dtype)
        return super().reducer_override(obj)


def _from_buffer(buf: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The receiving end of a strided array: C-ordered over the buffer it was laid out in."""
    return np.frombuffer(buf, dtype=dtype).reshape(shape) if len(shape) else np.frombuffer(buf, dtype)


def raw(buffer: Any) -> Any:
    """A contiguous bytes-like view of one of :func:`dumps`' buffers (a strided array: copied)."""
    if isinstance(buffer, np.ndarray):
        return memoryview(np.ascontiguousarray(buffer).reshape(-1).view(np.uint8))
    return buffer.raw()


def buffer_nbytes(buffer: Any) -> int:
    return buffer.nbytes if isinstance(buffer, np.ndarray) else buffer.raw().nbytes


def loads(header: bytes, buffers: list[Any]) -> Any:
    return pickle.loads(header, buffers=buffers)


class Layout:
    """Plans where values go in one segment, then writes them there.

    Two steps so that one segment of the exact total size can be leased between them.
    """

    def __init__(self, locate: Callable[[np.ndarray], tuple[Segment, int] | None] | None = None):
        self.nbytes = 0
        self._writes: list[tuple[int, Any]] = []  # (offset, array or PickleBuffer)
        #: Where an array already in shared memory lies (``Arena.locate``): it is not copied.
        self._locate = locate
        #: Bytes of the values added so far that stay where they are.
        self.in_place = 0

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
            found = self._locate(value) if self._locate is not None else None
            if found is not None:
                home, at = found
                self.in_place += value.nbytes
                return lambda seg: ArraySlot(home.name, home.size, at, value.shape, value.dtype,
                                             readonly, private=not readonly)
            offset = self.reserve(value.nbytes)
            self._writes.append((offset, value))
            # The dtype itself, not its .str: "|V8" would turn a record array into raw bytes.
            return lambda seg: ArraySlot(seg.name, seg.size, offset, value.shape, value.dtype,
                                         readonly)
        header, buffers = dumps(value)
        if not buffers:
            return lambda seg: Inline(value)
        sizes = [buffer_nbytes(buf) for buf in buffers]
        offsets = [self.reserve(n) for n in sizes]
        self._writes.extend(zip(offsets, buffers))
        return lambda seg: Pickled(header, tuple(BufferSlot(seg.name, seg.size, o, n)
                                                 for o, n in zip(offsets, sizes)), readonly)

    def write(self, segment: Segment) -> None:
        """Copy every reserved value into ``segment``: the one copy the notebook makes.

        A large write is split into pieces copied on threads (NumPy releases the GIL): one
        thread's memcpy of a shard into shared memory runs at about 7 GB/s here, two at about
        13, so one core is not the limit of a scatter.
        """
        pairs = []
        for offset, value in self._writes:
            if isinstance(value, np.ndarray):
                dest = np.ndarray(value.shape, value.dtype, buffer=segment.mm, offset=offset)
                pairs.append((dest, value))
            else:
                raw = value.raw()
                pairs.append((np.frombuffer(segment.mm, np.uint8, raw.nbytes, offset),
                              np.frombuffer(raw, np.uint8)))
        self._writes.clear()
        total = sum(src.nbytes for _, src in pairs)
        threads = min(os.cpu_count() or 1, COPY_THREADS)
        if total < PARALLEL_COPY or threads < 2:
            for dest, src in pairs:
                np.copyto(dest, src, casting="no")
            return
        pieces = [piece for dest, src in pairs for piece in _pieces(dest, src)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda ds: np.copyto(ds[0], ds[1], casting="no"), pieces))


PARALLEL_COPY = 32 << 20  # bytes; below this, starting threads costs more than they save
COPY_THREADS = 4
PIECE = 16 << 20


def _pieces(dest: np.ndarray, src: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``dest`` and ``src`` cut alike into pieces of about :data:`PIECE` bytes."""
    k = max(1, src.nbytes // PIECE)
    if k == 1 or src.ndim == 0:
        return [(dest, src)]
    if src.flags.c_contiguous:
        dest, src = dest.reshape(-1), src.reshape(-1)
    axis = int(np.argmax(src.shape))
    return list(zip(np.array_split(dest, k, axis=axis), np.array_split(src, k, axis=axis)))


def open_entry(entry: Entry, token: Callable[[str, int, int, int], np.ndarray]) -> Any:
    """Engine side: the value an entry stands for, as views of shared memory where it lies."""
    if isinstance(entry, Inline):
        return entry.value
    if isinstance(entry, ArraySlot):
        dtype = np.dtype(entry.dtype)
        nbytes = int(np.prod(entry.shape, dtype=np.int64)) * dtype.itemsize
        base = (token(entry.segment, entry.size, entry.offset, nbytes, private=True)
                if entry.private else token(entry.segment, entry.size, entry.offset, nbytes))
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
