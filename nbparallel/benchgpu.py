"""The ``gpu`` group of ``nbparallel bench``: each GPU path against the device's own copy speed.

Run with ``nbparallel bench --only gpu`` on a machine whose engines are bound to GPUs (the
default wherever CuPy sees a device); elsewhere its rows say why they did not run. Two cases,
each beside a device-to-device copy measured in the same run on the same device:

* ``activation hop``: a forward-only pipeline run whose first stage (on one GPU engine) hands
  ``size_mb`` MB of CuPy activations, in 8 micro-batches, to the second (another GPU engine of
  this host) by CUDA IPC, minus the same run with 8-byte activations, as the ``pipeline`` group
  does; against 8 ``cudaMemcpy`` device-to-device copies of the same bytes, timed with CUDA
  events inside the engine.
* ``stencil``: a 5-point Laplacian RawKernel over one engine's device-resident shard of a
  float64 image, timed with CUDA events; its memory traffic (the padded input read once, the
  output written once) against a copy of the padded input (read once, written once).

Ratios are the GB/s of each case as a percentage of the copy's.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

import nbparallel

from .benchkit import HOP, HOP_MBS, MB, NB, Setup, Trial, check, measure, ready
from .dataplane.transport import CUDA_IPC
from .pipeline.runtime import Pipeline

if TYPE_CHECKING:
    from .session import Session

__all__ = ["COPY", "STENCIL", "group"]

COPY = "cupy device-to-device copy"
STENCIL = "stencil"
KERNEL = r'''
extern "C" __global__ void laplace5(const double* p, double* out, int h, int w) {
    int i = blockIdx.y * blockDim.y + threadIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= h || j >= w) return;
    int W = w + 2;
    const double* c = p + (i + 1) * W + (j + 1);
    out[i * w + j] = c[-W] + c[W] + c[-1] + c[1] - 4.0 * c[0];
}
'''
# The engine times its own device work with CUDA events: what is compared is the device's time,
# not ipyparallel's round trip.
TIME_COPIES = """
src = xp.ones(n // 8)
dst = xp.empty_like(src)
start, end = xp.cuda.Event(), xp.cuda.Event()
start.record()
for _ in range(copies):
    xp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes,
                                xp.cuda.runtime.memcpyDeviceToDevice,
                                xp.cuda.get_current_stream().ptr)
end.record()
end.synchronize()
t = xp.cuda.get_elapsed_time(start, end) / 1000
ok = bool((dst[:4] == 1).all())
"""
TIME_STENCIL = """
p = xp.pad(shard, 1, mode="edge")
h, w = shard.shape
res = xp.empty((h, w))
kern = xp.RawKernel(src, "laplace5")
grid, block = ((w + 15) // 16, (h + 15) // 16), (16, 16)
args = (p, res, xp.int32(h), xp.int32(w))
kern(grid, block, args)
start, end = xp.cuda.Event(), xp.cuda.Event()
start.record()
for _ in range(reps):
    kern(grid, block, args)
end.record()
end.synchronize()
t = xp.cuda.get_elapsed_time(start, end) / 1000 / reps
on_device = type(shard).__module__.split(".")[0] == "cupy"
first = float(res[1, 1])
"""
SENDER = """
big = xp.ones((1, ACT // 8))
def forward(x, ctx):
    return big if ACT and x[0, 0] else xp.asarray(x)
"""
RECEIVER = "def forward(x, ctx):\n    return x[:, :1].copy()\n"


def group(pool: Session, size_mb: int, repeat: int,
          say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of the ``gpu`` group (see the module docstring)."""
    gpus = [e for e in pool.ids if pool.info(e).get("gpu") and pool.plane.is_local(e)]
    if len(gpus) < 2:
        why = (f"needs two engines of this host bound to GPUs; this pool has {len(gpus)} "
               f"(start one where CuPy sees a device: `nbparallel bench -n 2 --only gpu`)")
        return [{**row, "error": why} for row in
                measure("gpu", NB, [HOP, STENCIL], None, repeat, say)
                + measure("gpu", COPY, [HOP, STENCIL], None, repeat, say)]
    act = size_mb * MB // HOP_MBS // 8 * 8
    side = int((size_mb * MB / 8) ** 0.5)
    stencil_bytes = ((side + 2) ** 2 + side * side) * 8
    return (measure("gpu", NB, [HOP], _hop(pool, gpus, act), repeat, say,
                    nbytes={HOP: act * HOP_MBS})
            + measure("gpu", COPY, [HOP], _copies(pool, gpus[0], act), repeat, say,
                      nbytes={HOP: act * HOP_MBS})
            + measure("gpu", NB, [STENCIL], _stencil(pool, gpus[0], side), repeat, say,
                      nbytes={STENCIL: stencil_bytes})
            + measure("gpu", COPY, [STENCIL], _copies(pool, gpus[0], (side + 2) ** 2 * 8,
                                                      what=STENCIL, count=1),
                      repeat, say, nbytes={STENCIL: 2 * (side + 2) ** 2 * 8}))


def _hop(pool: Session, gpus: list[int], act: int) -> Setup:
    @contextmanager
    def setup() -> Iterator[Trial]:
        pipe = Pipeline(pool.pool, pool.plane, pool.monitor)
        try:
            pipe.define("_nbp_bench_gpu_send", SENDER, gpus[0], {"ACT": act})
            pipe.define("_nbp_bench_gpu_recv", RECEIVER, gpus[1], {})
            ones, zeros = np.ones((HOP_MBS, 1)), np.zeros((HOP_MBS, 1))

            def trial(check_it: bool) -> dict[str, float]:
                cursor = pool.transfers.cursor
                t0 = time.perf_counter()
                got = pipe.run(ones, HOP_MBS)
                t1 = time.perf_counter()
                pipe.run(zeros, HOP_MBS)
                t2 = time.perf_counter()
                if check_it:
                    check(got, ones)
                    used = {t.transport for t in pool.transfers.since(cursor)[0]
                            if t.kind == "stage" and t.nbytes >= act}
                    if used != {CUDA_IPC}:
                        raise RuntimeError(f"the activations went by {sorted(used)}, not CUDA IPC")
                return {HOP: max((t1 - t0) - (t2 - t1), 1e-9)}
            yield trial
        finally:
            pipe.clear()
    return setup


def _copies(pool: Session, engine: int, nbytes: int, what: str = HOP,
            count: int = HOP_MBS) -> Setup:
    def trial(check_it: bool) -> dict[str, float]:
        out = nbparallel.scatter(TIME_COPIES, {}, reduce={"t": "list", "ok": "list"},
                                 engines=[engine], pool=pool, dashboard=False,
                                 namespace={"n": nbytes, "copies": count})
        if check_it and not all(out["ok"]):
            raise RuntimeError("the device copy did not copy")
        return {what: out["t"][0]}
    return ready(trial)


def _stencil(pool: Session, engine: int, side: int) -> Setup:
    @contextmanager
    def setup() -> Iterator[Trial]:
        img = np.random.default_rng(0).random((side, side))
        # Resident on the engine's device: the timed runs move no bytes to it.
        kept = nbparallel.scatter("shard = img", {"img": img}, keep=["shard"], engines=[engine],
                                  pool=pool, dashboard=False)["shard"]

        def trial(check_it: bool) -> dict[str, float]:
            out = nbparallel.scatter(TIME_STENCIL, {"shard": kept},
                                     reduce={"t": "list", "on_device": "list", "first": "list"},
                                     engines=[engine], pool=pool, dashboard=False,
                                     namespace={"src": KERNEL, "reps": 10})
            if check_it:
                p = img[0:3, 0:3]
                want = p[0, 1] + p[2, 1] + p[1, 0] + p[1, 2] - 4 * p[1, 1]
                if not out["on_device"][0] or not np.isclose(out["first"][0], want):
                    raise RuntimeError("the stencil did not run on a device-resident shard")
            return {STENCIL: out["t"][0]}
        try:
            yield trial
        finally:
            kept.free()
    return setup
