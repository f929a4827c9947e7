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
import types
from typing import Any

import numpy as np

from .. import gpu
from .. import precision as mixed
from ..comm import Comm
from ..cellcode import CellCode, compile_cell, unpack_names
from ..dataplane import remote
from .live import Publisher
from .replies import RankReply, StageReply
from .runner import failure, register_source

__all__ = ["define", "describe", "drop", "load", "pull", "run_rank", "state", "forget_comms",
           "BUCKET"]

HOOKS = ("forward", "backward", "backward_input", "backward_weight", "loss", "step", "gradients")

_stages: dict[str, dict[str, Any]] = {}


def define(name: str, cell: CellCode, names_blob: bytes, tp: Any = None,
           tp_rank: int = 0) -> StageReply:
    """Run a stage cell in a fresh namespace that replaces stage ``name`` on this engine.

    ``tp`` (a :class:`~nbparallel.comm.CommSpec`) makes it one rank of a tensor-parallel stage:
    the cell gets ``comm`` spanning the stage's engines, ``tp_rank`` and ``tp_size``.
    """
    register_source(cell)
    ns: dict[str, Any] = {"__builtins__": builtins, "__name__": f"__nbparallel_stage_{name}__"}
    ns.update(unpack_names(names_blob))
    ns["xp"] = gpu.array_module()
    comm = None
    if tp is not None:
        ns.update(tp_rank=tp_rank, tp_size=tp.size)
        comm = ns["comm"] = Comm(tp, tp_rank)
    try:
        exec(compile_cell(cell), ns)
    except Exception as exc:  # the user's exception, with their own line
        if comm is not None:
            comm._close(f"%%stage {name} raised {type(exc).__name__}")
        return StageReply(False, failure=failure(exc, cell.filename, stage=name,
                                                 **({"rank": tp_rank} if tp else {})))
    except BaseException:
        if comm is not None:
            comm._close("interrupted (KeyboardInterrupt)")
        raise
    if comm is not None:
        comm._close(None)
        ns["comm"] = None  # a run gives the stage a fresh comm; between runs there is none
    _stages[name] = ns
    return StageReply(True, **describe(name))


def describe(name: str) -> dict[str, Any]:
    """Which hooks stage ``name`` defines and how many bytes of arrays its namespace holds."""
    ns = _stages[name]
    hooks = tuple(h for h in HOOKS if callable(ns.get(h)))
    return {"hooks": hooks, "param_bytes": sum(a.nbytes for _, a in _arrays(ns))}


def state(name: str) -> list[tuple[tuple[Any, ...], Any]]:
    """Stage ``name``'s arrays by where they are held (see :func:`_arrays`), in host memory:
    what a data-parallel replica copies to start equal to this one."""
    return [(path, gpu.to_host(a)) for path, a in _arrays(_stages[name])]


def load(name: str, arrays: list[tuple[tuple[Any, ...], Any]]) -> int:
    """Overwrite stage ``name``'s arrays with another copy's :func:`state`, in place (the
    stage's functions keep referring to the same arrays); returns how many were copied."""
    ns = _stages[name]
    mine = dict(_arrays(ns))
    for path, value in arrays:
        dest = mine.get(path)
        if dest is None or dest.shape != value.shape:
            raise ValueError(f"the replica of stage `{name}` has no array {_path(path)} of shape "
                             f"{value.shape}; its cell made different variables than the first "
                             f"copy's (does it depend on something other than its inputs?)")
        dest[...] = value if isinstance(dest, np.ndarray) else gpu.array_module().asarray(value)
    return len(arrays)


def pull(name: str, var: str) -> Any:
    """A stage variable's current value (parameters, for checking or saving); ``var`` may name
    an attribute of one (``"fc1.weight"``)."""
    head, *attrs = var.split(".")
    value = _stages[name][head]
    for attr in attrs:
        value = getattr(value, attr)
    return gpu.to_host(value)


def drop(names: list[str]) -> None:
    for name in names:
        _stages.pop(name, None)


def run_rank(run: str, rank: int, ops: list[tuple[str, int, int]], names: dict[int, str],
             endpoints: dict[int, list[str]], n_stages: int, inputs: dict[int, Any],
             targets: dict[int, Any], train: bool, owner: str | None = None,
             gpu_stages: frozenset[int] = frozenset(), lead: bool = True,
             comms: dict[str, tuple[Any, int]] | None = None, precision: str = "fp32",
             scale: float = 1.0) -> RankReply:
    """Execute ``ops`` (kind, stage, micro-batch) in order; return outputs, losses, spans, stash.

    ``names`` maps the stages on this rank to their names; ``endpoints`` maps every stage to the
    direct-channel endpoints of its engines (several for a tensor-parallel stage: each gets the
    activation); ``owner`` enables shared-memory hand-off, and ``gpu_stages`` (the stages on
    engines bound to a GPU) CUDA IPC between them (see ``remote.send``). ``lead`` is false on
    the tensor ranks after the first: they compute like it, but only the first passes values
    on and reports losses. ``comms`` holds the comm specs (and this engine's rank in each) of
    its ``"tp"`` group (given to the stages as ``comm``), its ``"dp"`` replicas (gradients are
    summed over them before ``step()``) and, for fp16, the ``"world"`` of the run (whether any
    gradient overflowed). ``precision`` is what values travel in; ``scale`` the fp16 loss scale.
    """
    last = n_stages - 1
    ctxs: dict[tuple[int, int], dict[str, Any]] = {}
    finals: dict[int, Any] = {}
    out: dict[str, Any] = {"outputs": {}, "losses": {}, "spans": [], "sent": {},
                           "peak_stash": {s: 0 for s in names}}
    where: dict[str, Any] = {}
    live = Publisher()
    opened = _open(comms or {})
    before = {role: list(c._backend.received) for role, c in opened.items()}
    tp, dp = opened.get("tp"), opened.get("dp")
    low = precision != "fp32"
    # Gradients are final after a stage's last backward op: its replicas' sum starts there.
    done = {s: i for i, (kind, s, _) in enumerate(ops) if kind in ("B", "W")} if dp else {}
    reduced = 0.0
    try:
        for s in names:
            _stages[names[s]]["comm"] = tp
        for index, (kind, s, j) in enumerate(ops):
            where = {"stage": names[s], "microbatch": j, "op": kind}
            ns = _stages[names[s]]
            t0 = time.time()  # reset after a receive: waiting for a peer is bubble, not work
            if kind == "F":
                x = inputs.pop(j) if s == 0 else _receive(f"{run}:a:{s}:{j}", low)
                t0 = time.time()
                y = ns["forward"](x, ctxs.setdefault((s, j), {}))
                x = None  # a received activation's segment is free once nothing refers to it
                if s == last:
                    if train:
                        finals[j] = y
                    elif lead:
                        out["outputs"][j] = y
                elif lead:
                    _send(out["sent"], endpoints[s + 1], f"{run}:a:{s + 1}:{j}", y, s + 1,
                          owner, s + 1 in gpu_stages, precision)
                y = None
                stash = sum(1 for (ss, _) in ctxs if ss == s)
                out["peak_stash"][s] = max(out["peak_stash"][s], stash)
            elif kind in ("B", "I"):
                if s == last:
                    value, grad = ns["loss"](finals.pop(j), targets.pop(j))
                    if lead:
                        out["losses"][j] = float(value)
                    if scale != 1.0:
                        grad = grad * scale
                else:
                    grad = _receive(f"{run}:g:{s}:{j}", low)
                    t0 = time.time()
                hook = ns["backward"] if kind == "B" else ns["backward_input"]
                gin = hook(grad, ctxs[(s, j)])
                grad = None
                if kind == "B":  # before sending: the previous stage may reuse our input's segment
                    del ctxs[(s, j)]
                if s > 0 and lead:
                    _send(out["sent"], endpoints[s - 1], f"{run}:g:{s - 1}:{j}", gin, s - 1,
                          owner, s - 1 in gpu_stages, precision)
                gin = None
            elif kind == "W":
                ns["backward_weight"](ctxs.pop((s, j)))
            out["spans"].append((kind, s, j, t0, time.time()))
            if done.get(s) == index:
                where = {"stage": names[s], "op": "gradient sum over the replicas"}
                t1 = time.time()
                _sum_gradients(dp, _gradients(ns, names[s]), precision)
                reduced += time.time() - t1
            live.maybe(out["spans"], sent=dict(out["sent"]))
        where = {"op": "step"}
        skipped = False
        if train:
            if "world" in opened:
                where = {"op": "fp16 overflow check"}
                skipped = _unscale(opened["world"], names, scale, out["losses"])
            for s in sorted(names):
                ns = _stages[names[s]]
                if skipped:
                    for g in _gradients(ns, names[s]):
                        g[...] = 0
                    continue
                step = ns.get("step")
                if callable(step):
                    where = {"stage": names[s], "op": "step"}
                    step()
    except Exception as exc:  # reported with the stage, micro-batch and the user's own line
        remote.discard_run(f"{run}:")
        _close(opened, f"{where.get('stage', 'a stage')} raised {type(exc).__name__}")
        return RankReply(False, rank, failure=failure(exc, _filename(exc), **where))
    except BaseException:
        _close(opened, "interrupted (KeyboardInterrupt)")
        raise
    finally:
        for s in names:
            if names[s] in _stages:
                _stages[names[s]]["comm"] = None
    out["outputs"] = {j: _host(v) for j, v in out["outputs"].items()}
    received = tuple((c._backend.name, c._spec.engines[r], n - before[role][r])
                     for role, c in opened.items()
                     for r, n in enumerate(c._backend.received) if n > before[role][r])
    return RankReply(True, rank, skipped=skipped, reduce_seconds=reduced, received=received,
                     **out)


#: Gradients summed over the replicas in one call, at most (PyTorch DDP's bucket_cap_mb).
BUCKET = 25 << 20


def _gradients(ns: dict[str, Any], name: str) -> list[Any]:
    hook = ns.get("gradients")
    if not callable(hook):
        raise TypeError(f"stage `{name}` has no gradients() hook: a data-parallel or fp16 run "
                        f"needs one, returning the arrays backward accumulates into "
                        f"(e.g. `def gradients(): return [gW, gb]`)")
    return list(hook())


def _sum_gradients(dp: Comm, grads: list[Any], precision: str) -> None:
    """Sum ``grads`` over the replicas, in place: in buckets of up to :data:`BUCKET` bytes, one
    allreduce each (a single array is reduced where it lies), in 16 bits under bf16/fp16."""
    compress = None if precision == "fp32" else precision
    bucket: list[Any] = []
    size = 0
    for g in grads + [None]:
        fits = g is not None and (not bucket or (g.dtype == bucket[0].dtype
                                                 and size + g.nbytes <= BUCKET
                                                 and type(g) is type(bucket[0])))
        if fits:
            bucket.append(g)
            size += g.nbytes
            continue
        if len(bucket) == 1 and bucket[0].flags.c_contiguous:
            dp.allreduce(bucket[0], out=bucket[0], compress=compress)
        elif bucket:
            xp = np if isinstance(bucket[0], np.ndarray) else gpu.array_module()
            flat = xp.concatenate([b.reshape(-1) for b in bucket])
            dp.allreduce(flat, out=flat, compress=compress)
            at = 0
            for b in bucket:
                b[...] = flat[at:at + b.size].reshape(b.shape)
                at += b.size
        bucket, size = ([g], g.nbytes) if g is not None else ([], 0)


def _unscale(world: Comm, names: dict[int, str], scale: float, losses: dict[int, float]) -> bool:
    """fp16: divide every gradient by the loss scale; whether any engine of the run found an
    inf or nan (in a gradient or a loss), in which case every engine skips the step."""
    found = any(not np.isfinite(v) for v in losses.values())
    for s in names:
        grads = _gradients(_stages[names[s]], names[s])
        for g in grads:
            g *= 1.0 / scale
        found = found or mixed.nonfinite(grads)
    return bool(world.allreduce(int(found), "max"))


def _send(sent: dict[str, int], endpoints: list[str], tid: str, value: Any, to_stage: int,
          owner: str | None, gpu_stage: bool, how: str) -> None:
    value = mixed.to_low(value, how) if how != "fp32" else value
    for endpoint in endpoints:  # every tensor rank of the next stage gets the whole value
        _count(sent, to_stage, *remote.send(endpoint, tid, value, owner, gpu_stage))


def _receive(tid: str, low: bool) -> Any:
    value = remote.receive(tid)
    return mixed.to_high(value) if low else value


#: The comms of the pipeline's runs, by id: kept from one run to the next (the notebook keeps
#: their specs while the layout stays the same), so a step does not pay for opening them and for
#: their first touch of fresh shared memory.
_comms: dict[str, Comm] = {}


def _open(specs: dict[str, tuple[Any, int]]) -> dict[str, Comm]:
    """This run's comms by role: the ones kept from an earlier run, or new."""
    opened = {}
    for role, (spec, r) in specs.items():
        if spec.id not in _comms:
            _comms[spec.id] = Comm(spec, r)
        opened[role] = _comms[spec.id]
    return opened


def _close(opened: dict[str, Comm], failure_text: str | None) -> None:
    """A run failed: tell the comms' other ranks, and forget the comms (the next run gets
    fresh ones)."""
    for comm in opened.values():
        comm._close(failure_text)
        _comms.pop(comm._spec.id, None)


def forget_comms(ids: list[str]) -> None:
    """Close the kept comms ``ids`` (the notebook's stages or layout changed)."""
    for cid in ids:
        comm = _comms.pop(cid, None)
        if comm is not None:
            comm._close(None)


def _arrays(ns: dict[str, Any]) -> list[tuple[tuple[Any, ...], Any]]:
    """The arrays a stage holds, by path: array variables, and arrays inside its lists, tuples
    and dicts and in the attributes of its objects (such as :mod:`nbparallel.tp` layers), up to
    :data:`DEPTH` levels down."""
    found: list[tuple[tuple[Any, ...], Any]] = []
    for key, value in ns.items():
        if not key.startswith("__") and key not in ("comm", "xp"):
            _walk(value, (key,), found, DEPTH)
    return found


#: How deep :func:`_arrays` looks inside a stage's containers and objects.
DEPTH = 3


def _walk(value: Any, path: tuple[Any, ...], found: list[Any], depth: int) -> None:
    if _is_array(value):
        found.append((path, value))
        return
    if depth == 0 or isinstance(value, (str, bytes, type)) or callable(value):
        return
    if isinstance(value, (list, tuple)):
        inner: Any = enumerate(value)
    elif isinstance(value, dict):
        inner = value.items()
    elif hasattr(value, "__dict__") and not isinstance(value, types.ModuleType):
        inner = vars(value).items()
    else:
        return
    for k, v in inner:
        _walk(v, path + (k,), found, depth - 1)


def _is_array(value: Any) -> bool:
    # Arrays only (NumPy's or CuPy's): a NumPy scalar has nbytes too, but cannot be written into.
    return isinstance(value, np.ndarray) or (type(value).__module__.startswith("cupy")
                                             and hasattr(value, "shape"))


def _path(path: tuple[Any, ...]) -> str:
    return path[0] + "".join(f"[{k!r}]" if not isinstance(k, str) else f".{k}" for k in path[1:])


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
