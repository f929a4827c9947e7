"""Runs a cell inside an engine process and reports values or the user's own traceback.

These functions are sent to engines by reference (``nbparallel.engine.runner.run_scatter``), so the
engines need nbparallel installed, as they do in every supported set-up. The values they read and
keep live in the engine's half of the data plane (``dataplane/remote.py``); what they answer is
one of the dataclasses of ``replies.py``.
"""

from __future__ import annotations

import builtins
import linecache
import os
import time
import traceback
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import cloudpickle

from .. import gpu, tables
from ..cores import THREAD_VARS, usable_cores
from ..cellcode import CellCode, compile_cell, unpack_names
from ..comm import Comm, CommSpec
from ..comm.mpi import mpi_rank
from ..dataplane import parcel, remote
from ..dataplane.addresses import route_address
from ..errors import NbparallelError, RemoteFailure
from .replies import ScatterReply

__all__ = ["run_scatter", "run_packed", "base_namespace", "engine_info", "cluster_address", "probe_gpus",
           "bind_gpu", "limit_threads", "register_source", "failure"]


def register_source(cell: CellCode) -> None:
    # Tracebacks read source lines through linecache; register the cell so they show the user's line.
    lines = cell.source.splitlines(keepends=True)
    linecache.cache[cell.filename] = (len(cell.source), None, lines, cell.filename)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def failure(exc: BaseException, filename: str, **where: Any) -> RemoteFailure:
    """``exc`` as the notebook shows it: the traceback from the user's cell ``filename`` on
    (the runner's own frames dropped), with where it happened; the notebook fills in the engine.

    An nbparallel error raised under the user's code (a ``comm`` call that could not complete)
    ends at the user's line: the frames inside nbparallel say nothing the message does not."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    if tb is None:  # not raised from the cell (a payload that did not open): all of it
        tb = exc.__traceback__
    if isinstance(exc, NbparallelError) and tb is not None and filename:
        frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith(_PACKAGE)]
        text = "".join(["Traceback (most recent call last):\n", *traceback.format_list(frames),
                        *traceback.format_exception_only(type(exc), exc)])
    else:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    return RemoteFailure(-1, type(exc).__name__, str(exc), text, **where)


def _summary(exc: BaseException, filename: str) -> str:
    """One line for the other ranks of a comm: what failed here, and at which line of the cell."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    at = f" (line {lines[-1]})" if lines else ""
    return f"{type(exc).__name__}: {exc}"[:500] + at


def run_packed(blob: bytes) -> Any:
    """``fn(*args)`` of ``blob = cloudpickle.dumps((fn, args))`` (``Pool.apply_packed``)."""
    fn, args = cloudpickle.loads(blob)
    return fn(*args)


def base_namespace(names_blob: bytes) -> dict[str, Any]:
    """A cell's globals: builtins, the notebook names it uses, and ``xp``."""
    ns: dict[str, Any] = {"__builtins__": builtins, "__name__": "__nbparallel_cell__"}
    ns.update(unpack_names(names_blob))
    ns["xp"] = gpu.array_module()
    return ns


def run_scatter(cell: CellCode, names_blob: bytes, payload: list[Any], rank: int, size: int,
                halo: tuple[int, int], outputs: list[str], keep: dict[str, str] | None = None,
                todo: remote.Chores | None = None, comm: CommSpec | None = None) -> ScatterReply:
    """Run a ``%%scatter`` cell on this engine's shard (``payload``: the notebook's notes).

    Small outputs come back in the reply; large arrays wait in the stash for the notebook's
    ``collect`` (so they can be written straight into the final array); names in ``keep`` stay
    resident under the given keys. The reply also lists the shared-memory segments this engine
    still holds views of. With ``comm`` the cell gets a :class:`~nbparallel.comm.Comm` of that
    spec as ``comm``, and the reply says what it did.
    """
    t0 = time.time()
    remote.chores(todo)
    remote.clear_stash()
    reply = _scatter_once(cell, names_blob, payload, rank, size, halo, outputs, keep or {}, comm)
    # After the cell's namespace is gone:
    return replace(reply, held=tuple(remote.held()), time=(t0, time.time()))


def _scatter_once(cell: CellCode, names_blob: bytes, payload: list[Any], rank: int, size: int,
                  halo: tuple[int, int], outputs: list[str], keep: dict[str, str],
                  spec: CommSpec | None) -> ScatterReply:
    register_source(cell)
    comm = None
    try:
        if spec is not None:  # first: the other ranks learn of any failure below through it
            comm = Comm(spec, rank)
        ns = base_namespace(names_blob)
        ns.update(gpu.to_device(remote.open_payload(payload)))  # shards go to the GPU once
    except Exception as exc:  # a resident value that is gone, or a payload that did not arrive
        if comm is not None:
            comm._close(_summary(exc, ""))
        return ScatterReply(False, rank, failure=failure(exc, "", rank=rank))
    ns.update(rank=rank, size=size, halo=tuple(halo), comm=comm)
    try:
        exec(compile_cell(cell), ns)
    except Exception as exc:  # the user's exception, reported with their own line
        stats = comm._close(_summary(exc, cell.filename)) if comm is not None else None
        return ScatterReply(False, rank, failure=failure(exc, cell.filename, rank=rank), comm=stats)
    except BaseException:  # Ctrl-C: the other ranks stop waiting for this one at once
        if comm is not None:
            comm._close("interrupted (KeyboardInterrupt)")
        raise
    stats = comm._close(None) if comm is not None else None
    reply = _outputs(ns, rank, outputs, keep)
    return replace(reply, comm=stats)


def _outputs(ns: dict[str, Any], rank: int, outputs: list[str], keep: dict[str, str]) -> ScatterReply:
    missing = tuple(name for name in outputs if name not in ns)
    if missing:
        return ScatterReply(False, rank, missing=missing)
    values: dict[str, Any] = {}
    pending: dict[str, tuple[Any, Any]] = {}
    kept: dict[str, Any] = {}
    for name in outputs:
        if name in keep:
            remote.keep(keep[name], ns[name])
            kept[name] = _meta(ns[name])
            continue
        value = gpu.to_host(ns[name])
        if parcel.is_plain_array(value) and value.nbytes >= parcel.INLINE_LIMIT:
            remote.stash(name, value)
            pending[name] = _meta(value)
        elif tables.is_table(value) and tables.nbytes(value) >= parcel.INLINE_LIMIT:
            remote.stash(name, value)  # its columns go by shared memory, not in the reply
            pending[name] = _meta(value)
        else:
            values[name] = value
    return ScatterReply(True, rank, values, pending, kept)


def _meta(value: Any) -> tuple[Any, Any]:
    """(shape, dtype) of an array, (None, TableMeta) of a table, or (None, type name)."""
    if tables.is_table(value):
        return None, tables.meta(value)  # a Series has a shape and a dtype, and an index too
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None, type(value).__name__
    return tuple(shape), dtype  # the dtype itself: the .str of a record dtype is only "|V8"


def limit_threads(engines_on_host: int) -> int | None:
    """Share this host's cores among its engines' BLAS and OpenMP pools, in a running engine.

    For engines nbparallel did not start (it sets the variables when it does): the pools
    already loaded are narrowed with threadpoolctl, the variables cover those loaded later.
    An engine whose launcher set any of the variables keeps what it was given. Returns the
    threads per pool, or None when left alone.
    """
    if any(var in os.environ for var in THREAD_VARS):
        return None
    n = max(1, usable_cores() // max(1, engines_on_host))
    os.environ.update({var: str(n) for var in THREAD_VARS})
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an engine's own environment on another host may lack it
        return n
    threadpool_limits(n)  # called, not entered: the limit stays after the call
    return n


def engine_info() -> dict[str, Any]:
    """Host, pid and device of this engine, for the pool's engine table.

    ``gpu`` describes the bound CUDA device (index, uuid, pci, name, total) or is None.
    ``address`` is where the rest of the cluster reaches it (:func:`cluster_address`).
    ``mpi`` is the engine's ``rank`` in its MPI ``world`` (an id shared by the ranks of one
    launch) when it is an MPI rank (``ipengine --mpi``), else None.
    """
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "device": gpu.device_name(),
            "gpu": gpu.bound(), "address": cluster_address(),
            "mpi": mpi_rank()}



#: Set on an engine whose cluster reaches it by another address than the route to its controller.
ADDRESS_VAR = "NBPARALLEL_DATAPLANE_IP"


def cluster_address() -> str:
    """This engine's address on the network it shares with its controller.

    The interface of the route to the controller, so a channel listens on that one network and
    nowhere else; ``$NBPARALLEL_DATAPLANE_IP`` overrides it where the notebook reaches engines by
    another network. Loopback when the controller is on this machine's loopback.
    """
    if os.environ.get(ADDRESS_VAR):
        return os.environ[ADDRESS_VAR]
    try:
        from ipyparallel.engine.app import IPEngine

        if IPEngine.initialized():
            controller = urlsplit(IPEngine.instance().registration_url).hostname
            if controller:
                return route_address(controller)
    except (ImportError, OSError, ValueError):
        pass
    return "0.0.0.0"  # not an ipyparallel engine (or no route): every interface


def probe_gpus() -> dict[str, Any]:
    """Host, pid and the CUDA device numbers this engine sees (imports CuPy if installed)."""
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "visible": [d["index"] for d in gpu.visible()]}


def bind_gpu(index: int | None) -> dict[str, Any]:
    """Bind this engine to CUDA device ``index`` (``None``: the CPU); returns its engine_info."""
    gpu.bind(index)
    return engine_info()
