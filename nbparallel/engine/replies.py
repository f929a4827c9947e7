"""What engines answer the notebook: frozen dataclasses with named fields, never bare tuples.

A failure inside user code travels as a :class:`~nbparallel.errors.RemoteFailure` whose
``engine`` the notebook fills in (an engine does not know its own id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import RemoteFailure

__all__ = ["ScatterReply", "FeedReply", "StageReply", "RankReply"]


@dataclass(frozen=True)
class ScatterReply:
    """One engine's run of a ``%%scatter`` cell.

    ``values`` came back in the reply; ``pending`` (name -> (shape, dtype)) wait in the engine's
    stash for the notebook's ``collect``; ``kept`` (name -> (shape, dtype) or (None, type name))
    stay resident. ``missing`` names outputs the cell never defined. ``held``: segments this engine
    still has views of; ``time``: the run's wall-clock start and end; ``comm``: what the cell's
    ``comm`` did (a :class:`~nbparallel.comm.CommStats`), when it had one.
    """

    ok: bool
    rank: int
    values: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    kept: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    failure: RemoteFailure | None = None
    held: tuple[str, ...] = ()
    time: tuple[float, float] | None = None
    comm: Any = None


@dataclass(frozen=True)
class FeedReply:
    """One engine's part of a ``%%pmap``, once the notebook said stop: how many ``chunks`` it
    ran (their results went back over the notebook's channel as each finished)."""

    chunks: int


@dataclass(frozen=True)
class StageReply:
    """A ``%%stage`` cell ran (``hooks`` it defines, bytes of arrays it holds) or failed."""

    ok: bool
    hooks: tuple[str, ...] = ()
    param_bytes: int = 0
    failure: RemoteFailure | None = None


@dataclass(frozen=True)
class RankReply:
    """One pipeline rank's run of its schedule: outputs and losses by micro-batch, its spans
    ``(kind, stage, mb, start, end)``, bytes sent by ``"transport>stage"``, and the most
    micro-batches each of its stages held at once. ``skipped``: an fp16 step skipped for an
    overflow; ``reduce_seconds``: time spent summing gradients over the replicas; ``received``:
    ``(backend, source engine, bytes)`` its tensor-parallel and replica comms read this run."""

    ok: bool
    rank: int
    outputs: dict[int, Any] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    spans: list[tuple[str, int, int, float, float]] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    peak_stash: dict[int, int] = field(default_factory=dict)
    failure: RemoteFailure | None = None
    skipped: bool = False
    reduce_seconds: float = 0.0
    received: tuple[tuple[str, int, int], ...] = ()
