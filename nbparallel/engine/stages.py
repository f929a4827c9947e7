"""Pipeline stages inside an engine: their namespaces, and the executor of one rank's schedule.

A ``%%stage`` cell runs once in a namespace that lives here for as long as the engine does; its
parameters never leave the engine. :func:`run_rank` executes one rank's ordered ops of a schedule:
activations go to the next stage's engine and gradients to the previous one over the engines'
signed direct channels (``dataplane/direct.py``), never through the notebook.
"""

from __future__ import annotations

import builtins
import time
from typing import Any

import numpy as np

from .. import gpu
from ..cellcode import CellCode, compile_cell, unpack_names
from ..dataplane import cudaipc, handoff, parcel
from ..dataplane.shm import NoRoom
from . import store
from .live import Publisher
from .runner import _failure, _register_source

__all__ = ["define", "describe", "drop", "pull", "run_rank"]

HOOKS = ("forward", "backward", "backward_input", "backward_weight", "loss", "step")
RECV_TIMEOUT = 600.0  # a stage may be slow; Ctrl-C (SIGINT) ends a wait sooner

_stages: dict[str, dict[str, Any]] = {}
_peers: dict[str, Any] = {}
_outbox: handoff.Outbox | None = None
_device_outbox: cudaipc.DeviceOutbox | None = None


def define(name: str, cell: CellCode, names_blob: bytes) -> dict[str, Any]:
    """Run a stage cell in a fresh namespace that replaces stage ``name`` on this engine."""
    _register_source(cell)
    ns: dict[str, Any] = {"__builtins__": builtins, "__name__": f"__nbparallel_stage_{name}__"}
    ns.update(unpack_names(names_blob))
    ns["xp"] = gpu.array_module()
    try:
        exec(compile_cell(cell), ns)
    except Exception as exc:  # the user's exception, with their own line
        return {"ok": False, "failure": _failure(exc, cell.filename, stage=name)}
    _stages[name] = ns
    return {"ok": True, **describe(name)}


def describe(name: str) -> dict[str, Any]:
    """Which hooks stage ``name`` defines and how many bytes of arrays its namespace holds."""
    ns = _stages[name]
    hooks = [h for h in HOOKS if callable(ns.get(h))]
    nbytes = sum(v.nbytes for k, v in ns.items()
                 if not k.startswith("__") and isinstance(getattr(v, "nbytes", None), int))
    return {"hooks": hooks, "param_bytes": nbytes}


def pull(name: str, var: str) -> Any:
    """A stage variable's current value (parameters, for checking or saving)."""
    return gpu.to_host(_stages[name][var])


def drop(names: list[str]) -> None:
    for name in names:
        _stages.pop(name, None)


def _peer(endpoint: str) -> Any:
    if endpoint not in _peers:
        from IPython import get_ipython

        from ..dataplane.addresses import check_reachable
        from ..dataplane.direct import Channel

        # A put waits RECV_TIMEOUT for its acknowledgement: find an unreachable stage now.
        check_reachable(endpoint, "the channel of a neighbouring stage")
        _peers[endpoint] = Channel(endpoint, get_ipython().kernel.session.key, timeout=RECV_TIMEOUT)
    return _peers[endpoint]


def _send(endpoint: str, tid: str, value: Any, owner: str | None,
          to_gpu: bool = False) -> tuple[int, str]:
    """Send ``value`` to the stage at ``endpoint``; returns the bytes moved and the transport.

    ``owner`` (the notebook arena's ``<kernel pid>-<tag>``) is given when every engine shares this
    host: large values then go through this engine's outbox segments and only their address is
    sent. ``to_gpu`` says the receiving engine has a GPU too: CuPy arrays then go by CUDA IPC,
    device to device.
    """
    global _outbox
    if owner is not None and to_gpu and gpu.bound():
        sent = _send_device(endpoint, tid, value, owner)
        if sent is not None:
            return sent
    header, buffers = parcel.dumps(value)
    if owner is not None and sum(b.raw().nbytes for b in buffers) >= handoff.THRESHOLD:
        if _outbox is None or _outbox.owner != owner:
            close_outbox()
            _outbox = handoff.Outbox(owner)
        try:
            note = _outbox.pack(header, buffers)
        except NoRoom:
            pass  # every segment is still being read: this one goes over the socket
        else:
            _peer(endpoint).put(tid, note, [])
            return len(header) + sum(b.raw().nbytes for b in buffers), "shm"
    return _peer(endpoint).put(tid, header, [b.raw() for b in buffers]), "direct"


def _send_device(endpoint: str, tid: str, value: Any, owner: str) -> tuple[int, str] | None:
    global _device_outbox
    cp = gpu.cupy_if_device()
    if _device_outbox is None or _device_outbox.owner != owner:
        if _device_outbox is not None:
            _device_outbox.close()
        _device_outbox = cudaipc.DeviceOutbox(cp, owner)
    try:
        packed = _device_outbox.pack(value)
    except NoRoom:
        return None  # every slot is still being read: this one goes through the host
    if packed is None:
        return None
    note, nbytes = packed
    _peer(endpoint).put(tid, note, [])
    return nbytes, "cuda-ipc"


def _recv(tid: str) -> Any:
    header, frames = store._server.take(tid, RECV_TIMEOUT)
    if cudaipc.is_ipc(header):
        return cudaipc.receive(gpu.cupy_if_device(), header)
    if handoff.is_handoff(header):
        return handoff.receive(header)
    return parcel.loads(header, [bytearray(f) for f in frames])


def outbox_segments() -> list[str]:
    """Names of this engine's hand-off segments (to check that a warm pipeline reuses them)."""
    return [seg.name for seg in _outbox.segments] if _outbox is not None else []


def close_outbox() -> None:
    """Unlink this engine's hand-off segments and unmap those it received."""
    global _outbox, _device_outbox
    if _outbox is not None:
        _outbox.close()
        _outbox = None
    handoff.forget()
    if _device_outbox is not None:
        _device_outbox.close()
        _device_outbox = None
    cudaipc.forget(gpu.cupy_if_device() if gpu.bound() else None)


def run_rank(run: str, rank: int, ops: list[tuple[str, int, int]], names: dict[int, str],
             endpoints: dict[int, str], n_stages: int, inputs: dict[int, Any],
             targets: dict[int, Any], train: bool, owner: str | None = None,
             gpu_stages: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Execute ``ops`` (kind, stage, micro-batch) in order; return outputs, losses, spans, stash.

    ``names`` maps the stages on this rank to their names; ``endpoints`` maps every stage to the
    direct-channel endpoint of its engine; ``owner`` enables shared-memory hand-off, and
    ``gpu_stages`` (the stages on engines bound to a GPU) CUDA IPC between them (see _send).
    """
    last = n_stages - 1
    ctxs: dict[tuple[int, int], dict[str, Any]] = {}
    finals: dict[int, Any] = {}
    out: dict[str, Any] = {"outputs": {}, "losses": {}, "spans": [], "sent": {},
                           "peak_stash": {s: 0 for s in names}}
    where: dict[str, Any] = {}
    live = Publisher()
    try:
        for kind, s, j in ops:
            where = {"stage": names[s], "microbatch": j, "op": kind}
            ns = _stages[names[s]]
            t0 = time.time()  # reset after a receive: waiting for a peer is bubble, not work
            if kind == "F":
                x = inputs.pop(j) if s == 0 else _recv(f"{run}:a:{s}:{j}")
                t0 = time.time()
                y = ns["forward"](x, ctxs.setdefault((s, j), {}))
                x = None  # a received activation's segment is free once nothing refers to it
                if s == last:
                    if train:
                        finals[j] = y
                    else:
                        out["outputs"][j] = y
                else:
                    _count(out["sent"], s + 1,
                           *_send(endpoints[s + 1], f"{run}:a:{s + 1}:{j}", y, owner,
                                 s + 1 in gpu_stages))
                y = None
                stash = sum(1 for (ss, _) in ctxs if ss == s)
                out["peak_stash"][s] = max(out["peak_stash"][s], stash)
            elif kind in ("B", "I"):
                if s == last:
                    value, grad = ns["loss"](finals.pop(j), targets.pop(j))
                    out["losses"][j] = float(value)
                else:
                    grad = _recv(f"{run}:g:{s}:{j}")
                    t0 = time.time()
                hook = ns["backward"] if kind == "B" else ns["backward_input"]
                gin = hook(grad, ctxs[(s, j)])
                grad = None
                if kind == "B":  # before sending: the previous stage may reuse our input's segment
                    del ctxs[(s, j)]
                if s > 0:
                    _count(out["sent"], s - 1,
                           *_send(endpoints[s - 1], f"{run}:g:{s - 1}:{j}", gin, owner,
                                 s - 1 in gpu_stages))
                gin = None
            elif kind == "W":
                ns["backward_weight"](ctxs.pop((s, j)))
            out["spans"].append((kind, s, j, t0, time.time()))
            live.maybe(out["spans"], sent=dict(out["sent"]))
        where = {"op": "step"}
        if train:
            for s in sorted(names):
                step = _stages[names[s]].get("step")
                if callable(step):
                    where = {"stage": names[s], "op": "step"}
                    step()
    except Exception as exc:  # reported with the stage, micro-batch and the user's own line
        if store._server is not None:
            store._server.discard_prefix(f"{run}:")
        return {"ok": False, "failure": _failure(exc, _filename(exc), **where), "rank": rank}
    out["outputs"] = {j: _host(v) for j, v in out["outputs"].items()}
    return {"ok": True, "rank": rank, **out}


def _count(sent: dict[str, int], to_stage: int, nbytes: int, transport: str) -> None:
    key = f"{transport}>{to_stage}"  # the notebook maps the stage to its engine
    sent[key] = sent.get(key, 0) + nbytes


def _filename(exc: BaseException) -> str:
    # The innermost frame from a cell: stage hooks are defined in cells named <%%stage ...>.
    tb, name = exc.__traceback__, ""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<"):
            name = tb.tb_frame.f_code.co_filename
            break
        tb = tb.tb_next
    return name


def _host(value: Any) -> Any:
    value = gpu.to_host(value)
    return np.asarray(value) if hasattr(value, "__array__") else value
