"""Runs a cell inside an engine process and reports values or the user's own traceback.

These functions are sent to engines by reference (``nbparallel.engine.runner.run_scatter``), so the
engines need nbparallel installed, as they do in every supported set-up.
"""

from __future__ import annotations

import builtins
import linecache
import os
import time
import traceback
from typing import Any

from .. import gpu
from ..cellcode import RESULT_NAME, CellCode, compile_cell, unpack_names
from ..dataplane import parcel
from . import store

__all__ = ["run_scatter", "run_pmap_chunk", "engine_info", "probe_gpus", "bind_gpu"]


def _register_source(cell: CellCode) -> None:
    # Tracebacks read source lines through linecache; register the cell so they show the user's line.
    lines = cell.source.splitlines(keepends=True)
    linecache.cache[cell.filename] = (len(cell.source), None, lines, cell.filename)


def _failure(exc: BaseException, filename: str, **where: Any) -> dict[str, Any]:
    tb = exc.__traceback__
    # Drop the runner's own frames: the traceback starts at the user's cell.
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {"ename": type(exc).__name__, "evalue": str(exc), "traceback": text, **where}


def _base_namespace(names_blob: bytes) -> dict[str, Any]:
    ns: dict[str, Any] = {"__builtins__": builtins, "__name__": "__nbparallel_cell__"}
    ns.update(unpack_names(names_blob))
    ns["xp"] = gpu.array_module()
    return ns


def run_scatter(cell: CellCode, names_blob: bytes, payload: Any, rank: int, size: int,
                halo: tuple[int, int], outputs: list[str], keep: dict[str, str] | None = None,
                todo: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Run a ``%%scatter`` cell on this engine's shard.

    Small outputs come back in the reply; large arrays wait in the store for the notebook's
    ``collect`` (so they can be written straight into the final array); names in ``keep`` stay
    resident under the given keys. The reply also lists the shared-memory segments this engine
    still holds views of.
    """
    t0 = time.time()
    store.chores(todo)
    store.clear_stash()
    reply = _scatter_once(cell, names_blob, payload, rank, size, halo, outputs, keep or {})
    reply["held"] = store.held()  # after the cell's namespace is gone
    reply["time"] = (t0, time.time())
    return reply


def _scatter_once(cell: CellCode, names_blob: bytes, payload: Any, rank: int, size: int,
                  halo: tuple[int, int], outputs: list[str], keep: dict[str, str]) -> dict[str, Any]:
    _register_source(cell)
    try:
        ns = _base_namespace(names_blob)
        for part in payload if isinstance(payload, list) else [payload]:
            ns.update(gpu.to_device(store.open_payload(part)))  # shards go to the GPU once
    except Exception as exc:  # a resident value that is gone, or a payload that did not arrive
        return {"ok": False, "failure": {"ename": type(exc).__name__, "evalue": str(exc),
                                         "traceback": traceback.format_exc(), "rank": rank}}
    ns.update(rank=rank, size=size, halo=tuple(halo))
    try:
        exec(compile_cell(cell), ns)
    except Exception as exc:  # the user's exception, reported with their own line
        return {"ok": False, "failure": _failure(exc, cell.filename, rank=rank)}
    missing = [name for name in outputs if name not in ns]
    if missing:
        return {"ok": False, "missing": missing, "rank": rank}
    values: dict[str, Any] = {}
    pending: dict[str, tuple[tuple[int, ...], str]] = {}
    kept: dict[str, Any] = {}
    for name in outputs:
        if name in keep:
            store.keep(keep[name], ns[name])
            kept[name] = _meta(ns[name])
            continue
        value = gpu.to_host(ns[name])
        if parcel.is_plain_array(value) and value.nbytes >= parcel.INLINE_LIMIT:
            store.stash(name, value)
            pending[name] = _meta(value)
        else:
            values[name] = value
    return {"ok": True, "values": values, "pending": pending, "kept": kept}


def _meta(value: Any) -> tuple[Any, Any]:
    """(shape, dtype) of an array, or (None, type name) of anything else."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None, type(value).__name__
    return tuple(shape), dtype  # the dtype itself: the .str of a record dtype is only "|V8"


def run_pmap_chunk(cell: CellCode, target: str, names_blob: bytes, items: Any
                   ) -> tuple[list[tuple[int, bool, Any]], float, list[str] | None, float]:
    """Run a ``%%pmap`` body once per ``(index, item)``; each result is ``(index, ok, value)``.

    A failing item does not stop the chunk: its value is the failure record instead. The seconds
    the chunk took come back too, so the notebook can size the next chunks. ``items`` is a list,
    or a shared-memory payload entry for one; then the segments still held come back as well.
    Last comes the wall-clock start, for the notebook's telemetry.
    """
    started, t0 = time.time(), time.perf_counter()
    if isinstance(items, list):
        return _pmap_items(cell, target, names_blob, items), time.perf_counter() - t0, None, started
    out = _pmap_items(cell, target, names_blob, store.open_payload({"items": items})["items"])
    return out, time.perf_counter() - t0, store.held(), started


def _pmap_items(cell: CellCode, target: str, names_blob: bytes,
                items: list[tuple[int, Any]]) -> list[tuple[int, bool, Any]]:
    _register_source(cell)
    base = _base_namespace(names_blob)
    body = compile_cell(cell)
    bind = compile(f"{target} = __nbparallel_item__", "<%%pmap target>", "exec")
    out: list[tuple[int, bool, Any]] = []
    for index, item in items:
        ns = dict(base)
        ns["__nbparallel_item__"] = item
        try:
            exec(bind, ns)
            exec(body, ns)
        except Exception as exc:  # recorded per item, the rest of the chunk still runs
            out.append((index, False, _failure(exc, cell.filename, item=index)))
            continue
        out.append((index, True, gpu.to_host(ns.get(RESULT_NAME))))
    return out


def engine_info() -> dict[str, Any]:
    """Host, pid and device of this engine, for the pool's engine table.

    ``gpu`` describes the bound CUDA device (index, uuid, pci, name, total) or is None.
    ``ident`` is the engine's identity with the controller: a load-balanced task lost with its
    engine is reported under it alone, after the client has forgotten the engine's id.
    """
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "device": gpu.device_name(),
            "gpu": gpu.bound(), "ident": _ident()}


def _ident() -> str | None:
    from IPython import get_ipython

    ident = getattr(getattr(get_ipython(), "kernel", None), "ident", None)
    return ident.decode() if isinstance(ident, bytes) else ident


def probe_gpus() -> dict[str, Any]:
    """Host, pid and the CUDA device numbers this engine sees (imports CuPy if installed)."""
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "visible": [d["index"] for d in gpu.visible()]}


def bind_gpu(index: int | None) -> dict[str, Any]:
    """Bind this engine to CUDA device ``index`` (``None``: the CPU); returns its engine_info."""
    gpu.bind(index)
    return engine_info()
