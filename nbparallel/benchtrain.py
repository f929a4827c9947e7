"""The ``train`` group of ``nbparallel bench``: what data parallelism and 16-bit transfers
cost a training step, beside the same step without them, in the same run.

What each row times (best and median of ``repeat`` steps, after a checked warm-up):

* ``dp step, 50 ms compute``: one stage on each of 2 engines (``--data-parallel 2``) whose
  forward and backward spin 25 ms each (fixed work, like a layer's matmuls), then the gradients
  (:data:`GRAD_BYTES` of float32) summed over the two replicas. ``no gradient sum`` is the same
  step whose ``gradients()`` returns nothing: the ratio is what the sum adds (the goal is at most
  10%). ``bf16 gradient sum`` sums them in 16 bits.
* ``2-stage step, 16 MB activations``: two stages on two engines, 8 micro-batches of 2 MB
  float32 activations each way (1F1B); ``fp32`` against ``bf16`` and ``fp16`` transfers. On one
  host the activations go through shared memory at memory speed, so the 16-bit rows pay the
  casts and gain little; across hosts the bytes halve on the network.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from .benchkit import MB, NB, Trial, measure
from .pipeline.runtime import Pipeline

if TYPE_CHECKING:
    from .session import Session

__all__ = ["DP_STEP", "PP_STEP", "GRAD_BYTES", "group"]

DP_STEP = "dp step, 50 ms compute"
PP_STEP = "2-stage step, 16 MB activations"
GRAD_BYTES = 16 * MB  #: a 4-million-parameter model's float32 gradients
ACT_ROWS, ACT_COLS = 64, 8192  # 2 MB of float32 a micro-batch

SPIN = """
import time
g = np.zeros(GRAD // 4, np.float32)
def _spin(seconds):
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass
def forward(x, ctx):
    _spin(0.025)
    return x
def backward(grad, ctx):
    _spin(0.025)
    g[:4] += 1
    return grad
def loss(y, t):
    return float(((y - t) ** 2).sum()), 2 * (y - t)
def gradients():
    return [g] if SUM else []
def step():
    g[...] = 0
"""

WIDE = """
def forward(x, ctx):
    return x * 1.0
def backward(grad, ctx):
    return grad * 1.0
def loss(y, t):
    return float(((y - t) ** 2).sum()), 2 * (y - t)
def gradients():
    return []
"""


def group(pool: Session, repeat: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of the ``train`` group (2 engines at least, else every row says so)."""
    if len(pool.ids) < 2:
        return [dict(r, error="needs 2 engines")
                for r in measure("train", NB, [DP_STEP, PP_STEP], None, repeat, say)]

    @contextmanager
    def pipe(cells: list[tuple[str, int, dict[str, Any]]]) -> Iterator[Pipeline]:
        # A pipeline of its own: the user's stages stay as they were.
        p = Pipeline(pool.pool, pool.plane, pool.monitor)
        try:
            for i, (cell, engine, ns) in enumerate(cells):
                p.define(f"_nbp_bench_{i}", cell, pool.ids[engine], {"np": np, **ns})
            yield p
        finally:
            p.clear()

    def dp(sums: bool, precision: str = "fp32") -> Callable[[], Any]:
        @contextmanager
        def setup() -> Iterator[Trial]:
            with pipe([(SPIN, 0, {"GRAD": GRAD_BYTES, "SUM": sums})]) as p:
                x = np.ones((2, 4))

                def trial(check: bool) -> dict[str, float]:
                    t0 = time.perf_counter()
                    p.train(x, x, 1, "1f1b", 1, dashboard=False, data_parallel=2,
                            precision=precision)
                    seconds = time.perf_counter() - t0
                    if check and sums and not p.last[-1].reduce_seconds > 0:
                        raise AssertionError("the gradients were not summed")
                    return {DP_STEP: seconds}
                yield trial
        return setup

    def pp(precision: str) -> Callable[[], Any]:
        @contextmanager
        def setup() -> Iterator[Trial]:
            with pipe([(WIDE, 0, {}), (WIDE, 1, {})]) as p:
                x = np.ones((8 * ACT_ROWS, ACT_COLS), np.float32)

                def trial(check: bool) -> dict[str, float]:
                    t0 = time.perf_counter()
                    loss = p.train(x, x, 8, "1f1b", 1, dashboard=False, precision=precision)
                    seconds = time.perf_counter() - t0
                    if check and loss != [0.0]:
                        raise AssertionError(f"identity stages gave loss {loss}, not 0")
                    return {PP_STEP: seconds}
                yield trial
        return setup

    return (measure("train", NB, [DP_STEP], dp(True), repeat, say)
            + measure("train", "no gradient sum", [DP_STEP], dp(False), repeat, say)
            + measure("train", "bf16 gradient sum", [DP_STEP], dp(True, "bf16"), repeat, say)
            + measure("train", NB, [PP_STEP], pp("fp32"), repeat, say)
            + measure("train", "bf16 transfers", [PP_STEP], pp("bf16"), repeat, say)
            + measure("train", "fp16 transfers", [PP_STEP], pp("fp16"), repeat, say))
