"""The Python twins of ``%%stage`` and ``%pipeline``, on the current session's pipeline::

    from nbparallel import pipeline
    pipeline.stage("l1", STAGE_CELL_SOURCE)            # runs once on its engine
    pipeline.stage("l2", OTHER_STAGE_SOURCE)
    y = pipeline.run(x, microbatches=8)                # forward only (GPipe order)
    losses = pipeline.train(x, t, microbatches=8, schedule="1f1b", steps=3)
    pipeline.show()                                    # stages, engines, parameter bytes

``pool=`` names another session than the current one.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from .. import session as session_mod
from ..session import Session
from .runtime import Pipeline, StageInfo

__all__ = ["stage", "run", "train", "show", "grid", "where", "clear"]


def _pipeline(session: Session | None) -> Pipeline:
    return session_mod.resolve(session).pipeline


def stage(name: str, code: str, *, engine: int | None = None,
          engines: Sequence[int] | None = None, namespace: Mapping[str, Any] | None = None,
          pool: Session | None = None) -> StageInfo:
    """Define (or replace) stage ``name`` by running ``code`` once on its engine, or on each of
    ``engines`` (tensor parallel: the code gets ``comm`` spanning them, ``tp_rank``, ``tp_size``).

    >>> pipeline.stage("l1", "W = w1\\ndef forward(x, ctx):\\n    return x @ W")
    """
    if namespace is None:
        namespace = sys._getframe(1).f_globals
    return _pipeline(pool).define(name, code, engine, namespace, engines=engines)


def run(x: Any, microbatches: int = 1, *, dashboard: bool | None = None,
        pool: Session | None = None) -> Any:
    """Forward ``x`` through every stage in ``microbatches`` pieces; returns the joined output.

    >>> y = pipeline.run(x, microbatches=8)
    """
    return _pipeline(pool).run(x, microbatches, dashboard)


def train(x: Any, target: Any, microbatches: int = 1, *, schedule: str = "1f1b", steps: int = 1,
          dashboard: bool | None = None, max_stash: float | None = None,
          data_parallel: int = 1, precision: str = "fp32",
          checkpoint_every: int | None = None, checkpoint_dir: str | None = None,
          pool: Session | None = None) -> list[float]:
    """Train for ``steps`` mini-batches under ``schedule`` (``"auto"``: chosen after the first
    step from its measured op times, within ``max_stash`` activations per engine); returns each
    step's summed loss. ``data_parallel`` D trains D copies, each on its share of every
    micro-batch, gradients summed; ``precision`` "bf16"/"fp16" sends activations and gradients
    between engines in 16 bits. ``checkpoint_every`` K with ``checkpoint_dir`` saves the
    stages' arrays every K steps; if an engine dies, the run goes on from the last one.

    >>> losses = pipeline.train(x, t, microbatches=8, schedule="auto", steps=3)
    >>> losses = pipeline.train(x, t, microbatches=4, data_parallel=2, precision="bf16")
    """
    return _pipeline(pool).train(x, target, microbatches, schedule, steps, dashboard,
                                 max_stash=max_stash, data_parallel=data_parallel,
                                 precision=precision, checkpoint_every=checkpoint_every,
                                 checkpoint_dir=checkpoint_dir)


def show(*, pool: Session | None = None) -> list[StageInfo]:
    """The stages in order, with engines, hooks and parameter bytes."""
    return _pipeline(pool).show()


def where(data_parallel: int = 1, *, pool: Session | None = None) -> Any:
    """Where each stage's arrays live, by replica and tensor rank, drawn in a notebook cell
    (its ``str()`` is the text form); ``%pipeline show`` displays it.

    >>> pipeline.where(2)        # doctest: +SKIP
    """
    return _pipeline(pool).where(data_parallel)


def grid(data_parallel: int = 1, *, pool: Session | None = None) -> str:
    """Which engines run each stage in each of ``data_parallel`` replicas, as a table (tensor
    parallel stages list their engines in tensor rank order); ``%pipeline show`` prints it.

    >>> print(pipeline.grid(2))
    """
    pipe = _pipeline(pool)
    return pipe.layout(data_parallel).grid(list(pipe.stages))


def clear(*, pool: Session | None = None) -> None:
    """Remove every stage (``%pipeline clear``)."""
    _pipeline(pool).clear()
