"""Hand-off of CuPy arrays between processes of one host by CUDA IPC: no trip through the host.

The GPU twin of ``handoff.py``. The sender copies each device array of a value once, device to
device, into a slot of its :class:`DeviceOutbox`: device memory from ``cudaMalloc`` (CUDA IPC
exports whole allocations, never a piece of CuPy's pool) whose IPC handle is made once. Only the
handle and the layout travel, over the signed channel. The receiver opens the handle once per
slot and builds its arrays on that memory in place when it is on the same device, or copies them
to its own device (peer to peer) when it is not.

A slot is reused only when the receiver is done with it: a busy byte in a small shared-memory
segment (0600, named after the notebook's arena like every other segment) is set by the sender
and cleared by the receiver when the last array built on the delivery dies, after waiting for the
device, so a kernel still reading the slot is never overwritten.

CuPy is never imported here: callers pass the module (``gpu._cupy()``), so a CPU-only engine
never loads it. :func:`split` and :func:`join`, which take device arrays out of a value and put
them back, are plain Python.
"""

from __future__ import annotations

import io
import os
import pickle
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from .shm import NoRoom, Segment

__all__ = ["MARK", "THRESHOLD", "ALIGN", "split", "join", "DeviceOutbox", "is_ipc", "receive",
           "forget"]

MARK = b"NBP-IPC\0"  # a parcel header is a pickle and starts with b"\x80"; this cannot clash
THRESHOLD = 256 << 10  # below this a host round trip costs less than opening a handle
ALIGN = 256  # CUDA's allocation alignment: every array starts on it
FREE, BUSY = 0, 1
FLAG_BYTES = 4096


# -- a value without its device arrays -----------------------------------------------------------
class _Out(pickle.Pickler):
    def __init__(self, file: io.BytesIO, is_device: Callable[[Any], bool]):
        super().__init__(file, protocol=5)
        self.is_device = is_device
        self.arrays: list[Any] = []
        self._index: dict[int, int] = {}  # persistent ids skip pickle's memo: an array once

    def persistent_id(self, obj: Any) -> int | None:
        if not self.is_device(obj):
            return None
        if id(obj) not in self._index:
            self._index[id(obj)] = len(self.arrays)
            self.arrays.append(obj)
        return self._index[id(obj)]


class _In(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arrays: list[Any]):
        super().__init__(file)
        self.arrays = arrays

    def persistent_load(self, pid: Any) -> Any:
        return self.arrays[pid]


def split(value: Any, is_device: Callable[[Any], bool]) -> tuple[bytes, list[Any]]:
    """``value`` pickled with every object for which ``is_device`` holds taken out, and those.

    >>> import numpy as np
    >>> skeleton, arrays = split({"x": np.ones(2), "n": 3}, lambda o: isinstance(o, np.ndarray))
    >>> len(arrays), join(skeleton, arrays)["n"]
    (1, 3)
    """
    buf = io.BytesIO()
    pickler = _Out(buf, is_device)
    pickler.dump(value)
    return buf.getvalue(), pickler.arrays


def join(skeleton: bytes, arrays: list[Any]) -> Any:
    """The value :func:`split` took apart, with ``arrays`` back in their places."""
    return _In(io.BytesIO(skeleton), arrays).load()


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# -- the sending side ---------------------------------------------------------------------------
@dataclass
class _Slot:
    flag: Segment  # byte 0: FREE or BUSY
    ptr: int
    size: int
    handle: bytes


class DeviceOutbox:
    """A sending process's reusable device slots on its current device.

    ``budget`` caps the bytes of all slots (default: an eighth of the device's memory); when it is
    reached and none is free, :meth:`pack` raises :class:`~nbparallel.dataplane.shm.NoRoom` and
    the caller sends through the host instead.
    """

    def __init__(self, cp: Any, owner: int | str, budget: int | None = None):
        self.cp = cp
        self.owner = owner
        self.device = int(cp.cuda.runtime.getDevice())
        self.bus = _bus_id(cp, self.device)
        self.budget = cp.cuda.runtime.memGetInfo()[1] // 8 if budget is None else budget
        self.slots: list[_Slot] = []

    def pack(self, value: Any) -> tuple[bytes, int] | None:
        """Copy the device arrays of ``value`` into a free slot; returns the message that points
        the receiver at it and the bytes copied, or None when ``value`` holds less than
        :data:`THRESHOLD` of them."""
        cp = self.cp
        skeleton, arrays = split(value, lambda o: isinstance(o, cp.ndarray))
        nbytes = sum(a.nbytes for a in arrays)
        if nbytes < THRESHOLD:
            return None
        arrays = [cp.ascontiguousarray(a) for a in arrays]
        spans, end = [], 0
        for a in arrays:
            spans.append((end, a.shape, a.dtype.str))
            end = _align(end + a.nbytes)
        slot = self._free(end)
        with cp.cuda.Device(self.device):
            for (offset, _, _), a in zip(spans, arrays):
                cp.cuda.runtime.memcpy(slot.ptr + offset, a.data.ptr, a.nbytes,
                                       cp.cuda.runtime.memcpyDeviceToDevice)
            # A device-to-device cudaMemcpy returns before it is done: the receiver may only
            # look once it is.
            cp.cuda.runtime.deviceSynchronize()
        slot.flag.mm[0] = BUSY
        _own[slot.flag.name] = slot
        return MARK + pickle.dumps((slot.flag.name, os.getpid(), slot.handle, slot.size,
                                    self.bus, spans, skeleton)), nbytes

    def _free(self, need: int) -> _Slot:
        free = [s for s in self.slots if s.flag.mm[0] == FREE and s.size >= need]
        if free:
            return min(free, key=lambda s: s.size)
        size = _align(max(need, 1 << 20))
        for slot in sorted((s for s in self.slots if s.flag.mm[0] == FREE), key=lambda s: s.size):
            if self._total() + size <= self.budget:
                break
            self._drop(slot)  # free slots too small for this value make way for one that fits
        if self._total() + size > self.budget:
            raise NoRoom(f"device outbox holds {self._total()} bytes; {size} more exceed its "
                         f"budget of {self.budget}")
        cp = self.cp
        with cp.cuda.Device(self.device):
            ptr = int(cp.cuda.runtime.malloc(size))
            try:
                handle = bytes(cp.cuda.runtime.ipcGetMemHandle(ptr))
                flag = Segment.create(FLAG_BYTES, self.owner)
            except BaseException:
                cp.cuda.runtime.free(ptr)
                raise
        slot = _Slot(flag, ptr, size, handle)
        self.slots.append(slot)
        return slot

    def _total(self) -> int:
        return sum(s.size for s in self.slots)

    def _drop(self, slot: _Slot) -> None:
        self.slots.remove(slot)
        _own.pop(slot.flag.name, None)
        slot.flag.unlink()
        slot.flag.close()
        with self.cp.cuda.Device(self.device):
            self.cp.cuda.runtime.free(slot.ptr)

    def close(self) -> None:
        """Free every slot. Receivers that still use one keep reading memory the driver keeps
        until they close their handle."""
        for slot in list(self.slots):
            self._drop(slot)


def _bus_id(cp: Any, device: int) -> str:
    return str(cp.cuda.runtime.deviceGetPCIBusId(device)).lower()


# -- the receiving side -------------------------------------------------------------------------
def is_ipc(header: bytes) -> bool:
    return bytes(header[:len(MARK)]) == MARK


@dataclass
class _Opened:
    flag: Segment
    ptr: int
    size: int
    live: int = 0  # deliveries whose arrays are still alive


_own: dict[str, _Slot] = {}  # this process's own slots: a stage that sends to itself
_opened: dict[str, _Opened] = {}
OPENED_MAX = 64  # a sender replaces slots now and then; old mappings must not pile up


class _Delivery:
    """Owner of the memory under one delivery's arrays; clears the busy byte when they die."""


def receive(cp: Any, header: bytes) -> Any:
    """The value a CUDA IPC message points at, its arrays on this process's current device."""
    name, pid, handle, size, bus, spans, skeleton = pickle.loads(bytes(header[len(MARK):]))
    device = int(cp.cuda.runtime.getDevice())
    if pid == os.getpid():
        ptr, flag = _own[name].ptr, _own[name].flag
        opened = None
    else:
        opened = _open(cp, name, handle, size)
        ptr, flag = opened.ptr, opened.flag
    if bus != _bus_id(cp, device):
        # Another GPU: copy to this one (peer to peer where the devices allow it), then the slot
        # is free at once.
        arrays = []
        for offset, shape, dtype in spans:
            out = cp.empty(shape, dtype)
            cp.cuda.runtime.memcpy(out.data.ptr, ptr + offset, out.nbytes,
                                   cp.cuda.runtime.memcpyDefault)
            arrays.append(out)
        cp.cuda.runtime.deviceSynchronize()
        flag.mm[0] = FREE
        return join(skeleton, arrays)
    owner = _Delivery()
    if opened is not None:
        opened.live += 1
    weakref.finalize(owner, _release, cp, device, flag.mm, opened)
    mem = cp.cuda.UnownedMemory(ptr, size, owner, device)
    arrays = [cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(mem, offset))
              for offset, shape, dtype in spans]
    return join(skeleton, arrays)


def _open(cp: Any, name: str, handle: bytes, size: int) -> _Opened:
    opened = _opened.get(name)
    if opened is None:  # slot names are never reused: one open per slot
        flag = Segment.attach(name, FLAG_BYTES)
        try:
            ptr = int(cp.cuda.runtime.ipcOpenMemHandle(handle))
        except Exception as exc:
            flag.close()
            raise RuntimeError(
                f"CUDA IPC: this engine cannot open the device memory another process of this "
                f"host shared with it ({exc}). Processes in separate containers must share the "
                f"IPC namespace (docker run --ipc=host); or set NBPARALLEL_CUDA_IPC=0 in the "
                f"notebook to send CuPy arrays through host memory."
            ) from None
        opened = _opened[name] = _Opened(flag, ptr, size)
        for old in [n for n, o in _opened.items() if o.live == 0 and n != name]:
            if len(_opened) <= OPENED_MAX:
                break
            _close(cp, _opened.pop(old))
    return opened


def _release(cp: Any, device: int, mm: Any, opened: _Opened | None) -> None:
    try:
        with cp.cuda.Device(device):
            cp.cuda.runtime.deviceSynchronize()  # kernels queued on the arrays have run
        mm[0] = FREE
    except Exception:
        pass  # the mapping was closed by forget(), or the device is gone with the process
    if opened is not None:
        opened.live -= 1


def _close(cp: Any, opened: _Opened) -> None:
    try:
        cp.cuda.runtime.ipcCloseMemHandle(opened.ptr)
    except Exception:
        pass  # the context is already gone
    opened.flag.close()


def forget(cp: Any | None) -> None:
    """Close every handle opened so far (the pool disconnected)."""
    for opened in _opened.values():
        if cp is not None:
            _close(cp, opened)
        else:
            opened.flag.close()
    _opened.clear()
