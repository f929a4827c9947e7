"""Pipeline stages inside an engine: their namespaces, and the executor of one rank's schedule.

A ``%%stage`` cell runs once in a namespace that lives here for as long as the engine does; its
parameters never leave the engine. :func:`run_rank` executes one rank's ordered ops of a schedule:
activations go to the next stage's engine and gradients to the previous one engine to engine
(``dataplane/remote.py`` sends them by the transport the chooser picks), never through the
notebook.
"""

from __future__ import annotations

import builtins
import time
from typing import Any

import numpy as np

from .. import gpu
from ..cellcode import CellCode, compile_cell, unpack_names
from ..dataplane import remote
from .live import Publisher
from .replies import RankReply, StageReply
from .runner import failure, register_source

__all__ = ["define", "describe", "drop", "pull", "run_rank"]

HOOKS = ("forward", "backward", "backward_input", "backward_weight", "loss", "step")

_stages: dict[str, dict[str, Any]] = {}


def define(name: str, cell: CellCode, names_blob: bytes) -> StageReply:
    """Run a stage cell in a fresh namespace that replaces stage ``name`` on this engine."""
    register_source(cell)
    ns: dict[str, Any] = {"__builtins__": builtins, "__name__": f"__nbparallel_stage_{name}__"}
    ns.update(unpack_names(names_blob))
    ns["xp"] = gpu.array_module()
    try:
        exec(compile_cell(cell), ns)
    except Exception as exc:  # the user's exception, with their own line
        return StageReply(False, failure=failure(exc, cell.filename, stage=name))
    _stages[name] = ns
    return StageReply(True, **describe(name))


def describe(name: str) -> dict[str, Any]:
    """Which hooks stage ``name`` defines and how many bytes of arrays its namespace holds."""
    ns = _stages[name]
    hooks = tuple(h for h in HOOKS if callable(ns.get(h)))
    nbytes = sum(v.nbytes for k, v in ns.items()
                 if not k.startswith("__") and isinstance(getattr(v, "nbytes", None), int))
    return {"hooks": hooks, "param_bytes": nbytes}


def pull(name: str, var: str) -> Any:
    """A stage variable's current value (parameters, for checking or saving)."""
    return gpu.to_host(_stages[name][var])


def drop(names: list[str]) -> None:
    for name in names:
        _stages.pop(name, None)


def run_rank(run: str, rank: int, ops: list[tuple[str, int, int]], names: dict[int, str],
             endpoints: dict[int, str], n_stages: int, inputs: dict[int, Any],
             targets: dict[int, Any], train: bool, owner: str | None = None,
             gpu_stages: frozenset[int] = frozenset()) -> RankReply:
    """Execute ``ops`` (kind, stage, micro-batch) in order; return outputs, losses, spans, stash.

    ``names`` maps the stages on this rank to their names; ``endpoints`` maps every stage to the
    direct-channel endpoint of its engine; ``owner`` enables shared-memory hand-off, and
    ``gpu_stages`` (the stages on engines bound to a GPU) CUDA IPC between them
    (see ``remote.send``).
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
                x = inputs.pop(j) if s == 0 else remote.receive(f"{run}:a:{s}:{j}")
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
                           *remote.send(endpoints[s + 1], f"{run}:a:{s + 1}:{j}", y, owner,
                                        s + 1 in gpu_stages))
                y = None
                stash = sum(1 for (ss, _) in ctxs if ss == s)
                out["peak_stash"][s] = max(out["peak_stash"][s], stash)
            elif kind in ("B", "I"):
                if s == last:
                    value, grad = ns["loss"](finals.pop(j), targets.pop(j))
                    out["losses"][j] = float(value)
                else:
                    grad = remote.receive(f"{run}:g:{s}:{j}")
                    t0 = time.time()
                hook = ns["backward"] if kind == "B" else ns["backward_input"]
                gin = hook(grad, ctxs[(s, j)])
                grad = None
                if kind == "B":  # before sending: the previous stage may reuse our input's segment
                    del ctxs[(s, j)]
                if s > 0:
                    _count(out["sent"], s - 1,
                           *remote.send(endpoints[s - 1], f"{run}:g:{s - 1}:{j}", gin, owner,
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
        remote.discard_run(f"{run}:")
        return RankReply(False, rank, failure=failure(exc, _filename(exc), **where))
    out["outputs"] = {j: _host(v) for j, v in out["outputs"].items()}
    return RankReply(True, rank, **out)


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
