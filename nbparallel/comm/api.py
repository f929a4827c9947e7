"""The ``comm`` object of a cell: collectives between the engines that run it.

In a ``%%scatter`` cell, ``comm`` spans the engines of that cell, ranks in the cell's rank order
(``comm.rank == rank``)::

    %%scatter u --keep u
    for step in range(500):
        ext = comm.halo(u, 1)                      # one row of each neighbour attached
        u = 0.25 * (ext[:-2] + ext[2:] + ...)      # the stencil on the extended block
    total = comm.allreduce(float(u.sum()))

Names and meanings follow mpi4py's lowercase methods. Arrays move as bytes, never pickled; other
values are pickled (cloudpickle where plain pickle cannot). Every rank reduces in rank order, so
every rank gets the same bits. A wait is bounded by the comm timeout, and a rank that fails
releases the others, which raise :class:`~nbparallel.PeerFailed`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import numpy as np

from .. import gpu, precision
from ..dataplane.transport import SHM
from ..errors import CommError, UsageError
from ..partition import bounds
from . import channel
from .backend import EACH, EVERYONE, Backend, Call
from .ops import as_array, check_op, describe, dtype_name, reduce_into, reduce_values, reduce_wide
from .spec import MPI_BACKEND, CommSpec, CommStats

__all__ = ["Comm", "LARGE"]

#: Arrays from this many bytes are reduced block by block, each rank reducing one block.
LARGE = 256 << 10
#: Elements reduced at a time: a chunk and its result stay in the core's cache between the
#: reduction and the copy that follows it.
CHUNK = 1 << 15
#: What ``allreduce(compress=...)`` takes: the 16-bit formats of :mod:`nbparallel.precision`.
COMPRESS = ("bf16", "fp16")
#: Spans kept per cell (one per call); further calls are counted, not timed one by one.
MAX_SPANS = 5000


class Comm:
    """Collectives between the ranks of one cell. ``rank`` and ``size`` are this rank's number
    and how many take part.

    >>> total = comm.allreduce(local_sum)             # doctest: +SKIP
    >>> parts = comm.allgather(len(shard))            # doctest: +SKIP
    """

    def __init__(self, spec: CommSpec, rank: int):
        self.rank = rank
        self.size = spec.size
        self._spec = spec
        self._backend = _backend(spec, rank)
        self._seq = 0
        self._broken: str | None = None
        self._sent: dict[tuple[int, int], int] = {}
        self._got: dict[tuple[int, int], int] = {}
        self._spans: list[tuple[str, float, float]] = []
        self._calls = 0
        self._descs: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        return f"<comm rank {self.rank} of {self.size} ({self._backend.name})>"

    # -- the calls -----------------------------------------------------------------------------
    def _call(self, name: str, desc: str, line: int) -> "_Calling":
        if self._broken is not None:
            raise CommError(
                f"comm.{name} cannot run: an earlier comm call in this cell failed "
                f"({self._broken}), so the ranks no longer agree on where they are. Fix that "
                f"failure; the next cell gets a fresh comm.")
        self._seq += 1
        call = Call(self._seq, desc, line)
        self._backend.enter(call)
        return _Calling(self, name, call)

    def barrier(self) -> None:
        """Wait until every rank has called ``barrier``."""
        with self._call("barrier", "barrier()", _line()) as call:
            self._backend.round(call, EVERYONE, [None])

    def bcast(self, value: Any = None, root: int = 0) -> Any:
        """``value`` of rank ``root``, on every rank."""
        self._rank_arg("bcast", "root", root)
        with self._call("bcast", describe("bcast", root=root), _line()) as call:
            got = self._backend.round(call, EVERYONE, [value if self.rank == root else None])
            return value if self.rank == root else got.get(root)

    def allreduce(self, value: Any, op: str = "sum", *, out: np.ndarray | None = None,
                  compress: str | None = None) -> Any:
        """``value`` of every rank combined by ``op`` (sum, prod, min, max), on every rank;
        elementwise for arrays. ``out`` (an array of the same shape and dtype, the input itself
        for in place; a CuPy array too, filled from the host) receives the result.

        ``compress="bf16"`` or ``"fp16"`` (PyTorch DDP's ``bf16_compress_hook`` and
        ``fp16_compress_hook``): a floating-point array travels between the ranks in 16 bits,
        half the bytes of float32 (a quarter of float64), is reduced in float32, and the result
        has the input's dtype again. Every rank still gets the same bits, within the 16-bit
        rounding of the exact result (2**-8 relative per rounding for bf16, 2**-11 for fp16; an
        array of :data:`LARGE` bytes or more is rounded once more, as its reduced blocks travel
        in 16 bits too). fp16 ends at 65504: larger values become inf (on that block path, larger
        sums too). Every rank must pass the same ``compress``. For gradients::

            for g in grads:
                comm.allreduce(g, out=g, compress="bf16")     # summed in place, 16 bits moved
        """
        if out is not None and type(out).__module__.startswith("cupy"):
            # A device out=: reduced through the host like any CuPy value, then copied in.
            if tuple(out.shape) != tuple(getattr(value, "shape", ())) or out.dtype != getattr(
                    value, "dtype", None):
                raise CommError(f"comm.allreduce: out= must be a {getattr(value, 'dtype', '?')} "
                                f"array of shape {tuple(getattr(value, 'shape', ()))}, but it is "
                                f"{out.dtype} {tuple(out.shape)}.")
            result = (self._compressed(value, op, None, compress, _line()) if compress is not None
                      else self._reduce("allreduce", value, op, None, None, _line()))
            out[...] = gpu.array_module().asarray(result)
            return out
        if compress is not None:
            return self._compressed(value, op, out, compress, _line())
        return self._reduce("allreduce", value, op, None, out, _line())

    def reduce(self, value: Any, op: str = "sum", root: int = 0) -> Any:
        """Like :meth:`allreduce`, but the result is only on ``root`` (None elsewhere)."""
        self._rank_arg("reduce", "root", root)
        return self._reduce("reduce", value, op, root, None, _line())

    def allgather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        with self._call("allgather", "allgather()", _line()) as call:
            got = self._backend.round(call, EVERYONE, [value])
            return [value if r == self.rank else got.get(r) for r in range(self.size)]

    def gather(self, value: Any, root: int = 0) -> list[Any] | None:
        """Every rank's ``value`` in rank order on ``root``; None elsewhere."""
        self._rank_arg("gather", "root", root)
        with self._call("gather", describe("gather", root=root), _line()) as call:
            got = self._backend.round(call, EACH, _only(self.size, root, value))
            if self.rank != root:
                return None
            return [value if r == self.rank else got.get(r) for r in range(self.size)]

    def scatter(self, parts: Sequence[Any] | None = None, root: int = 0) -> Any:
        """Rank ``r`` gets ``parts[r]`` of ``root``'s list (the others pass nothing)."""
        self._rank_arg("scatter", "root", root)
        if self.rank == root:
            parts = self._parts("scatter", parts)
        with self._call("scatter", describe("scatter", root=root), _line()) as call:
            got = self._backend.round(call, EACH, parts if self.rank == root else [None] * self.size)
            return parts[root] if self.rank == root else got.get(root)  # type: ignore[index]

    def alltoall(self, parts: Sequence[Any]) -> list[Any]:
        """``parts[j]`` goes to rank ``j``; the answer's item ``i`` came from rank ``i``."""
        parts = self._parts("alltoall", parts)
        with self._call("alltoall", "alltoall()", _line()) as call:
            got = self._backend.round(call, EACH, parts)
            return [parts[r] if r == self.rank else got.get(r) for r in range(self.size)]

    def reduce_scatter(self, array: Any, op: str = "sum", axis: int = 0) -> Any:
        """``array`` of every rank combined by ``op``; this rank gets its block along ``axis``,
        with ``numpy.array_split``'s bounds (the same rows ``%%scatter`` would give it)."""
        check_op(op, "reduce_scatter")
        arr, device, axis = _rows_arg("reduce_scatter", array, axis, "; use comm.allreduce for scalars")
        desc = describe("reduce_scatter", arr, op=op, axis=axis)
        with self._call("reduce_scatter", desc, _line()) as call:
            blocks = np.array_split(arr, self.size, axis)
            got = self._backend.round(call, EACH, [None if r == self.rank else b
                                                   for r, b in enumerate(blocks)])
            parts = [blocks[r] if r == self.rank else got.get(r, copy=False)
                     for r in range(self.size)]
            result = reduce_into(op, parts, np.empty(blocks[self.rank].shape, arr.dtype))
            return _back(result, device)

    def halo(self, array: Any, k: int, axis: int = 0, periodic: bool = False, *,
             out: np.ndarray | None = None) -> Any:
        """``array`` with up to ``k`` rows of each neighbour attached along ``axis``: the last
        ``k`` rows of rank ``rank - 1`` before it, the first ``k`` of rank ``rank + 1`` after it
        (wrapping round with ``periodic``), the layout of ``%%scatter --halo``. ``out`` (of the
        extended shape) receives the result without a new array; when ``array`` already is the
        middle of ``out`` (a view), only the halo rows are written, the in-place way of an
        iterative stencil::

            ext = np.zeros((rows + 2, cols)); u = ext[1:-1]    # (rank 0 and the last: one side)
            for step in range(n):
                comm.halo(u, 1, out=ext)
                u[...] = stencil(ext)
        """
        arr, device, axis = _rows_arg("halo", array, axis)
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise CommError(f"comm.halo: k={k!r} must be a whole number of rows, 0 or more.")
        k = int(k)
        rows = arr.shape[axis]
        other = arr.shape[:axis] + arr.shape[axis + 1:]
        desc = describe("halo", None, k=k, axis=axis, periodic=periodic,
                        rows=f"{dtype_name(arr.dtype)} (..{other})")
        left, right = self._neighbours(periodic)
        with self._call("halo", desc, _line()) as call:
            if k > rows:
                raise CommError(
                    f"comm.halo: k={k} rows were asked for, but rank {self.rank} has only {rows} "
                    f"along axis {axis} to give its neighbours. Use a smaller k, or fewer "
                    f"engines so that every block has at least k rows.")
            first, last = _rows(arr, axis, 0, k), _rows(arr, axis, rows - k, rows)
            items: list[Any] = [None] * self.size
            for r in {left, right} - {None, self.rank}:
                items[r] = (last if r == right else None, first if r == left else None)
            got = self._backend.round(call, EACH, items)
            lo = (last if left == self.rank else got.get(left, copy=False)[0]) if left is not None else None
            hi = (first if right == self.rank else got.get(right, copy=False)[1]) if right is not None else None
            pieces = [p for p in (lo, arr, hi) if p is not None]
            if out is None:
                return _back(np.concatenate(pieces, axis), device)
            _check_out("halo", out, sum(p.shape[axis] for p in pieces), arr, axis)
            at = 0
            for piece in pieces:
                n = piece.shape[axis]
                dest = _rows(out, axis, at, at + n)
                if piece is not arr or not _same_memory(dest, arr):  # the middle may be in place
                    np.copyto(dest, piece)
                at += n
            return out

    # -- point to point ------------------------------------------------------------------------
    def send(self, value: Any, dest: int, tag: int = 0) -> None:
        """Send ``value`` to rank ``dest``; returns once it is on its way (buffered at the
        receiver, so a send never waits for the matching recv)."""
        self._rank_arg("send", "dest", dest)
        n = self._sent.get((dest, tag), 0)
        self._sent[dest, tag] = n + 1
        with self._call("send", describe("send", dest=dest, tag=tag), _line()):
            host, _ = _host(value)
            channel.post(self._spec, dest, self._tid(self.rank, dest, tag, n), host,
                         self._backend.name == SHM)

    def recv(self, source: int, tag: int = 0) -> Any:
        """The next value rank ``source`` sent this rank with ``tag``, in the order sent."""
        self._rank_arg("recv", "source", source)
        n = self._got.get((source, tag), 0)
        with self._call("recv", describe("recv", source=source, tag=tag), _line()) as call:
            value = channel.take(self._backend, self._tid(source, self.rank, tag, n), call,
                                 [source], time.monotonic())
            self._got[source, tag] = n + 1
            return value

    def sendrecv(self, value: Any, dest: int, source: int, tag: int = 0) -> Any:
        """Send ``value`` to ``dest`` and receive from ``source`` (a shift needs no ordering)."""
        self.send(value, dest, tag)
        return self.recv(source, tag)

    def _tid(self, src: int, dst: int, tag: int, n: int) -> str:
        return f"{self._spec.id}:p:{src}>{dst}:{tag}:{n}"

    # -- for the runner ------------------------------------------------------------------------
    def _close(self, failure: str | None) -> CommStats:
        """The cell ended (``failure``: how it failed); tells the other ranks, frees memory."""
        self._backend.close(failure)
        return CommStats(self._backend.name, tuple(self._spans), self._calls,
                         tuple(self._backend.received))

    # -- helpers -------------------------------------------------------------------------------
    def _reduce(self, name: str, value: Any, op: str, root: int | None,
                out: np.ndarray | None, line: int) -> Any:
        check_op(op, name)
        host, device = _host(value)
        arr = as_array(host) if isinstance(host, (np.ndarray, np.generic)) else None
        if arr is None:  # Python objects (and numbers): pickled, combined with Python's operators
            if out is not None:
                raise CommError(f"comm.{name}: out= needs an array value, not "
                                f"{type(value).__name__}.")
            desc = self._descs.get((name, op))
            if desc is None:
                desc = self._descs[name, op] = describe(name, None, op=op)
            with self._call(name, desc, line) as call:
                items = [host] if root is None else _only(self.size, root, host)
                got = self._backend.round(call, EVERYONE if root is None else EACH, items)
                if root is not None and self.rank != root:
                    return None
                return reduce_values(op, [host if r == self.rank else got.get(r)
                                          for r in range(self.size)])
        if out is not None:
            _check_out(name, out, None, arr, None)
        with self._call(name, describe(name, arr, op=op), line) as call:
            if arr.nbytes < LARGE or self.size == 1:
                result = self._whole(call, op, arr, root, out)
            else:
                result = self._blocks(call, op, arr, root, out)
        if result is None:
            return None
        if isinstance(host, np.generic):
            return result[()]
        return _back(result, device) if out is None else out

    def _compressed(self, value: Any, op: str, out: np.ndarray | None, compress: Any,
                    line: int) -> Any:
        """allreduce with ``compress``: 16 bits on the wire (as uint16, which every backend
        carries: ml_dtypes' bfloat16 has no dtype string of its own), float32 sums."""
        check_op(op, "allreduce")
        name = precision.ALIASES.get(compress, compress) if isinstance(compress, str) else None
        if name not in COMPRESS:
            raise CommError(
                f"comm.allreduce: unknown compress={compress!r}; use compress=\"bf16\" (bfloat16: "
                f"float32's range, 8 significant bits) or \"fp16\" (float16: 11 bits, values up to "
                f"65504) to send 16 bits per element, or None to send the array as it is.")
        try:
            low = precision.low_dtype(name)
        except UsageError as exc:
            raise CommError(f"comm.allreduce(compress={name!r}): {exc}") from None
        host, device = _host(value)
        if not isinstance(host, np.ndarray) or not (host.dtype.kind == "f"
                                                    or host.dtype.name == "bfloat16"):
            what = f"an array of {host.dtype}" if isinstance(host, np.ndarray) else type(value).__name__
            raise CommError(
                f"comm.allreduce: compress={name!r} needs a floating-point array (float64, "
                f"float32, float16), not {what}: integers and Python numbers are reduced exactly "
                f"without compress (or np.asarray(x, float) first).")
        if out is not None:
            _check_out("allreduce", out, None, host, None)
        with self._call("allreduce", describe("allreduce", host, op=op, compress=name), line) as call:
            # The same choice of path as without compress (by the input's bytes): all ranks agree.
            if host.nbytes < LARGE or self.size == 1:
                result = self._whole_low(call, op, host, low, out)
            else:
                result = self._blocks_low(call, op, host, low, out)
        return _back(result, device) if out is None else out

    def _whole_low(self, call: Call, op: str, arr: np.ndarray, low: np.dtype,
                   out: np.ndarray | None) -> np.ndarray:
        mine = _cast(arr, low)  # this rank's part as the others get it: every rank, same bits
        got = self._backend.round(call, EVERYONE, [mine.view(np.uint16)])
        parts = [mine if r == self.rank else got.get(r, copy=False).view(low)
                 for r in range(self.size)]
        wide = out if out is not None and out.dtype == np.float32 else np.empty(arr.shape, np.float32)
        reduce_wide(op, parts, wide)  # the parts are copies: out may be the input
        if wide is out or arr.dtype == np.float32:
            return wide
        with np.errstate(over="ignore"):  # a float16 input: sums past 65504 are inf
            if out is None:
                return wide.astype(arr.dtype)
            out[...] = wide
            return out

    def _blocks_low(self, call: Call, op: str, arr: np.ndarray, low: np.dtype,
                    out: np.ndarray | None) -> np.ndarray:
        # As _blocks, 16 bits in both rounds: each block reduced in float32 a chunk at a time,
        # rounded to 16 bits where the gather round publishes it, and taken from there into the
        # result (on this rank too, so that every rank has the same bits).
        flat = _cast(arr, low).reshape(-1)
        wire = flat.view(np.uint16)
        spans = bounds(flat.size, self.size)
        got = self._backend.round(call, EACH, [None if r == self.rank else wire[a:b]
                                               for r, (a, b) in enumerate(spans)])
        a, b = spans[self.rank]
        mine = [flat[a:b] if r == self.rank else got.get(r, copy=False).view(low)
                for r in range(self.size)]
        target = out.reshape(-1) if out is not None else np.empty(flat.size, arr.dtype)
        room = self._backend.reserve((b - a) * 2)
        block = room.view(low) if room is not None else np.empty(b - a, low)
        wide = np.empty(min(CHUNK, b - a), np.float32)
        with np.errstate(over="ignore"):  # fp16: past 65504 is inf, as documented
            for lo in range(0, b - a, CHUNK):
                hi = min(lo + CHUNK, b - a)
                reduce_wide(op, [m[lo:hi] for m in mine], wide[:hi - lo])
                block[lo:hi] = wide[:hi - lo]
                target[a + lo:a + hi] = block[lo:hi]
        got = self._backend.round(call, EVERYONE, [block.view(np.uint16)])
        for r, (lo, hi) in enumerate(spans):
            if r != self.rank:
                target[lo:hi] = got.get(r, copy=False).view(low)
        return target.reshape(arr.shape)

    def _whole(self, call: Call, op: str, arr: np.ndarray, root: int | None,
               out: np.ndarray | None) -> np.ndarray | None:
        items = [arr] if root is None else _only(self.size, root, arr)
        got = self._backend.round(call, EVERYONE if root is None else EACH, items)
        if root is not None and self.rank != root:
            return None
        parts = [arr if r == self.rank else got.get(r, copy=False) for r in range(self.size)]
        return _reduce_to(op, parts, out if out is not None else np.empty(arr.shape, arr.dtype),
                          self.rank)

    def _blocks(self, call: Call, op: str, arr: np.ndarray, root: int | None,
                out: np.ndarray | None) -> np.ndarray | None:
        # Reduce-scatter then gather: rank r reduces block r straight from the others' memory.
        flat = np.ascontiguousarray(arr).reshape(-1)
        spans = bounds(flat.size, self.size)
        got = self._backend.round(call, EACH, [None if r == self.rank else flat[a:b]
                                               for r, (a, b) in enumerate(spans)])
        a, b = spans[self.rank]
        mine = [flat[a:b] if r == self.rank else got.get(r, copy=False) for r in range(self.size)]
        keep = root is None or self.rank == root
        target = (out.reshape(-1) if out is not None else np.empty(flat.size, arr.dtype)) if keep else None
        # The reduced block goes straight where the next round publishes it, and from there
        # (still in cache, chunk by chunk) into the result: one pass over memory fewer.
        room = self._backend.reserve((b - a) * arr.itemsize)
        if room is not None:
            block = room.view(arr.dtype)
        else:
            block = target[a:b] if target is not None else np.empty(b - a, arr.dtype)
        for lo in range(0, b - a, CHUNK):
            hi = min(lo + CHUNK, b - a)
            _reduce_to(op, [m[lo:hi] for m in mine], block[lo:hi], self.rank)
            if room is not None and target is not None:
                np.copyto(target[a + lo:a + hi], block[lo:hi])
        items = [block] if root is None else _only(self.size, root, block)
        got = self._backend.round(call, EVERYONE if root is None else EACH, items)
        if target is None:
            return None
        for r, (lo, hi) in enumerate(spans):
            if r != self.rank:
                np.copyto(target[lo:hi], got.get(r, copy=False))
        return target.reshape(arr.shape)

    def _rank_arg(self, call: str, name: str, value: Any) -> None:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value < self.size:
            raise CommError(
                f"comm.{call}: {name}={value!r} is not a rank of this comm, which has ranks "
                f"0 to {self.size - 1} (one per engine of the cell).")

    def _parts(self, call: str, parts: Any) -> list[Any]:
        if not isinstance(parts, (list, tuple)) or len(parts) != self.size:
            got = f"{len(parts)} items" if isinstance(parts, (list, tuple)) else type(parts).__name__
            raise CommError(
                f"comm.{call} needs a list of exactly {self.size} items, one per rank "
                f"(item j goes to rank j), but got {got}.")
        return [_host(p)[0] for p in parts]

    def _neighbours(self, periodic: bool) -> tuple[int | None, int | None]:
        left = self.rank - 1 if self.rank > 0 else (self.size - 1 if periodic else None)
        right = self.rank + 1 if self.rank < self.size - 1 else (0 if periodic else None)
        return left, right


class _Calling:
    """One call in progress: times it, and marks the comm broken if it fails (a class, not a
    generator context manager: it is on the path of every 8-byte allreduce)."""

    __slots__ = ("comm", "name", "call", "t0")

    def __init__(self, comm: Comm, name: str, call: Call):
        self.comm, self.name, self.call = comm, name, call

    def __enter__(self) -> Call:
        self.t0 = time.time()
        return self.call

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        comm = self.comm
        if kind is not None:
            comm._broken = f"{self.call}: {kind.__name__}"
        comm._calls += 1
        if len(comm._spans) < MAX_SPANS:
            comm._spans.append((self.name, self.t0, time.time()))


def _backend(spec: CommSpec, rank: int) -> Backend:
    if spec.backend == SHM:
        from .shm import ShmBackend

        return ShmBackend(spec, rank)
    if spec.backend == MPI_BACKEND:
        from .mpi import MpiBackend  # imports mpi4py: only on engines that are MPI ranks

        return MpiBackend(spec, rank)
    return channel.ChannelBackend(spec, rank)


def _line() -> int:
    """The line of the user's code that made the call (for the other ranks' reports)."""
    return sys._getframe(2).f_lineno


def _only(size: int, root: int, value: Any) -> list[Any]:
    items: list[Any] = [None] * size
    items[root] = value
    return items


def _reduce_to(op: str, parts: list[np.ndarray], dest: np.ndarray, own: int) -> np.ndarray:
    # From the third rank on, writing into dest first would overwrite this rank's own input
    # when the two are the same memory (in place): then reduce into a temporary.
    if own >= 2 and np.shares_memory(dest, parts[own]):
        np.copyto(dest, reduce_into(op, parts, np.empty_like(dest)))
        return dest
    return reduce_into(op, parts, dest)


def _cast(arr: np.ndarray, low: np.dtype) -> np.ndarray:
    """``arr`` as a new C-contiguous array of ``low`` (fp16: values past its range become inf)."""
    with np.errstate(over="ignore"):
        return arr.astype(low, order="C")


def _host(value: Any) -> tuple[Any, bool]:
    """``value`` in host memory, and whether it was a device (CuPy) array."""
    if type(value).__module__.startswith("cupy"):
        return gpu.to_host(value), True
    return value, False


def _back(value: Any, device: bool) -> Any:
    return gpu.array_module().asarray(value) if device else value


def _rows_arg(call: str, array: Any, axis: Any, hint: str = "") -> tuple[np.ndarray, bool, int]:
    """An array argument that has rows along ``axis``: (host array, was on device, axis)."""
    host, device = _host(array)
    arr = as_array(host)
    if arr is None or arr.ndim == 0:
        raise CommError(f"comm.{call} takes an array with at least one dimension, not "
                        f"{type(array).__name__}{hint}.")
    return arr, device, _axis(call, arr, axis)


def _axis(call: str, arr: np.ndarray, axis: Any) -> int:
    if not isinstance(axis, (int, np.integer)) or not -arr.ndim <= axis < arr.ndim:
        raise CommError(f"comm.{call}: axis={axis!r} is not an axis of an array of "
                        f"{arr.ndim} dimension(s).")
    return int(axis) % arr.ndim


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are the same elements (one a view of the other, exactly)."""
    return (a.shape == b.shape and a.strides == b.strides and np.may_share_memory(a, b)
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _rows(a: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[axis] = slice(lo, hi)
    return a[tuple(index)]


def _check_out(call: str, out: Any, rows: int | None, like: np.ndarray, axis: int | None) -> None:
    shape = list(like.shape)
    if axis is not None and rows is not None:
        shape[axis] = rows
    if not isinstance(out, np.ndarray) or tuple(out.shape) != tuple(shape) or out.dtype != like.dtype:
        got = (f"{out.dtype} {tuple(out.shape)}" if isinstance(out, np.ndarray)
               else type(out).__name__)
        raise CommError(f"comm.{call}: out= must be a {like.dtype} array of shape "
                        f"{tuple(shape)}, but it is {got}.")
    if call != "halo" and not out.flags.c_contiguous:
        raise CommError(f"comm.{call}: out= must be C-contiguous (np.ascontiguousarray).")
