"""Pipeline-parallel schedules as plain data: built, validated, simulated and drawn. Pure (stdlib only).

A *schedule* is, for each of ``p`` ranks (engines), the ordered list of compute ops that rank runs for
one training step over ``m`` micro-batches: ``F`` (forward), ``B`` (full backward) or, for zero-bubble
schedules, ``I`` (backward for the input: the activation gradient sent upstream) and ``W`` (backward
for the weights, which nothing downstream waits for). Sends and receives are implied by the
dependencies; :func:`comms` spells them out for a runtime.

Placement: the model is cut into ``S = p * v`` stages; stage ``s`` lives on rank ``s % p``, so rank
``r`` holds stages ``r, r + p, r + 2p, ...`` (Megatron-LM's interleaved placement; ``v = 1`` except
for the interleaved schedules), except for ``zb-v``, whose ``v = 2`` stages per rank form a V: rank
``r`` holds stages ``r`` and ``2p - 1 - r`` (:attr:`Schedule.placement`). Dependencies: ``F(s, j)`` needs ``F(s-1, j)``; ``B/I(s, j)`` needs
``F(s, j)`` and ``B/I(s+1, j)`` (the last stage computes the loss inside its first backward);
``W(s, j)`` needs ``I(s, j)``.

Schedules (see :func:`build`): ``gpipe`` (Huang et al., 2019: all forwards, then all backwards;
``train=False`` gives the forward-only inference schedule), ``1f1b`` (PipeDream-flush) and
``interleaved`` (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", SC21), ``zb-h1`` (Qi et al., "Zero Bubble (Almost) Pipeline Parallelism",
ICLR 2024), and the orders PyTorch builds on them: ``interleaved-zb`` (interleaved with the
zero-bubble split, PyTorch's ScheduleInterleavedZeroBubble) and ``zb-v`` (Qi et al.'s ZB-V,
PyTorch's ScheduleZBVZeroBubble). The interleaved schedules take any micro-batch count PyTorch
takes: micro-batches go in rounds of ``m // max(1, m // p)``, so ``m`` must divide into
``max(1, m // p)`` rounds. In a notebook, without running anything::

    %pipeline schedule --stages 4 --microbatches 8 --schedule 1f1b

>>> s = build("1f1b", p=2, m=3)
>>> [" ".join(map(str, ops)) for ops in s.ranks]
['F0 F1 B0 F2 B1 B2', 'F0 B0 F1 B1 F2 B2']
>>> round(simulate(s).bubble, 4) == round(theoretical_bubble("1f1b", 2, 3), 4)
True
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Iterable, Union

from ..errors import UsageError

__all__ = [
    "NAMES", "KINDS", "ScheduleError", "Op", "Send", "Recv", "Action", "Schedule", "Costs", "Span",
    "Simulation",
    "gpipe", "one_f_one_b", "interleaved", "zb_h1", "interleaved_zb", "zb_v", "build", "canonical", "check_size", "MAX_SIZE", "validate",
    "comms", "simulate",
    "bubble", "theoretical_bubble", "render",
]

NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1", "interleaved-zb", "zb-v")
#: The schedules that split each backward into I and W.
SPLIT = ("zb-h1", "interleaved-zb", "zb-v")
#: The schedules that run v > 1 stages per rank.
VIRTUAL = ("interleaved", "interleaved-zb", "zb-v")
KINDS = ("F", "B", "I", "W")


class ScheduleError(UsageError):
    """A schedule that cannot be built or would not run: bad options, wrong or missing ops, a deadlock."""


@dataclass(frozen=True)
class Op:
    """One compute op: ``kind`` ('F', 'B', 'I' or 'W') of micro-batch ``mb`` on stage ``stage``."""

    kind: str
    stage: int
    mb: int

    def label(self, with_stage: bool = False) -> str:
        # An Op does not know v, so str() stays short (with v == 1 the rank implies the stage).
        return f"{self.kind}{self.mb}@s{self.stage}" if with_stage else f"{self.kind}{self.mb}"

    def __str__(self) -> str:
        return self.label()


@dataclass(frozen=True)
class _Transfer:
    """``what`` ('act' or 'grad') of micro-batch ``mb`` between ``stage`` (on this rank) and
    ``peer_stage`` (on rank ``peer``)."""

    what: str
    stage: int
    peer_stage: int
    mb: int
    peer: int

    def __str__(self) -> str:
        arrow = "->" if isinstance(self, Send) else "<-"
        where = f"s{self.stage}{arrow}s{self.peer_stage}@r{self.peer}"
        return f"{type(self).__name__.lower()} {self.what}{self.mb} {where}"


class Send(_Transfer):
    """Right after the producing op. Sends never block (the receiver buffers), so cannot deadlock."""


class Recv(_Transfer):
    """Right before the consuming op; blocks until the data is there."""


Action = Union[Op, Send, Recv]


@dataclass(frozen=True)
class Schedule:
    """Per-rank compute op lists: ``ranks[r]`` is what rank ``r`` runs, in order.

    ``placement[s]`` is the rank stage ``s`` lives on; empty means round-robin (``s % p``).
    """

    name: str
    p: int
    m: int
    v: int
    ranks: tuple[tuple[Op, ...], ...]
    train: bool
    placement: tuple[int, ...] = ()

    @property
    def stages(self) -> int:
        return self.p * self.v

    def rank_of(self, stage: int) -> int:
        """The rank that holds ``stage``."""
        return self.placement[stage] if self.placement else stage % self.p


@dataclass(frozen=True)
class Costs:
    """Op durations for :func:`simulate`, for a whole rank's share of the model (one stage when v == 1).

    With ``v`` virtual stages each op covers 1/v of the rank's layers, so it costs ``cost / v``; ``comm``
    (one activation or gradient transfer between ranks) is not scaled, which is interleaving's real price.
    By default ``B = I + W`` so zero-bubble and plain schedules do the same work.

    ``stages``, when given, holds each stage's own ``(F, B, I, W)`` durations (not scaled by v)
    and overrides the four scalars: what a run measured (``choose.measured``), or a model whose
    stages are not equal.
    """

    f: float = 1.0
    b: float = 2.0
    i: float = 1.0
    w: float = 1.0
    comm: float = 0.0
    stages: tuple[tuple[float, float, float, float], ...] = ()

    def of(self, op: Op, v: int = 1) -> float:
        if self.stages:
            return self.stages[op.stage][KINDS.index(op.kind)]
        return {"F": self.f, "B": self.b, "I": self.i, "W": self.w}[op.kind] / v


@dataclass(frozen=True)
class Span:
    """When ``op`` ran on ``rank`` in a simulation."""

    rank: int
    op: Op
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    """Result of :func:`simulate`.

    ``bubble`` is the idle fraction ``1 - sum(busy) / (p * makespan)`` (:func:`bubble`, as for
    measured runs). ``peak_stash[r]`` is the most micro-batch activations rank ``r`` holds at once
    (F done, its B or I not yet done, over all the rank's stages). ``peak_inflight[r]`` also counts
    micro-batches whose I is done but W is not: W still needs the stage's saved input, so this is
    the count Qi et al. keep equal to 1F1B's peak.
    """

    spans: tuple[Span, ...]
    makespan: float
    bubble: float
    peak_stash: tuple[int, ...]
    busy: tuple[float, ...]
    peak_inflight: tuple[int, ...] = ()


# ----------------------------------------------------------------------------------------------------
# Builders


#: The most stage-micro-batches (p * v * m) a schedule may have: building and simulating one
#: costs about 20 us each here, so this bound keeps any schedule under about 2 s.
MAX_SIZE = 65_536


def check_size(p: int, m: int, v: int = 1) -> None:
    """Refuse a schedule too big to build in seconds (:data:`MAX_SIZE`), before building it."""
    if p * v * m > MAX_SIZE:
        raise ScheduleError(
            f"{p} stage(s) x {v} virtual x {m} micro-batches = {p * v * m:,} stage-micro-batches, "
            f"more than a schedule here can hold ({MAX_SIZE:,}); use fewer micro-batches (larger "
            f"ones) or fewer stages.")


def canonical(name: str) -> str:
    """``name`` as :data:`NAMES` spells it (aliases and case folded); unknown names unchanged."""
    key = str(name).strip().lower().replace("_", "-")
    return {"zbh1": "zb-h1", "pipedream-flush": "1f1b", "zbv": "zb-v",
            "interleaved-zero-bubble": "interleaved-zb"}.get(key, key)


def _check(name: str, p: int, m: int, v: int = 1, train: bool = True) -> str:
    """Normalise ``name`` and reject what no schedule can do, with one sentence saying how to fix it."""
    key = canonical(name)
    if key not in NAMES:
        raise ScheduleError(f"Unknown pipeline schedule {name!r}: choose one of {', '.join(NAMES)}.")
    for what, val, meaning in (("p", p, "ranks (stages)"), ("m", m, "micro-batches"),
                               ("v", v, "virtual stages per rank")):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ScheduleError(f"The number of {meaning} {what} must be a whole number >= 1, got {val!r}.")
    check_size(p, m, v)
    if key == "zb-v" and v != 2:
        raise ScheduleError(f"zb-v puts exactly 2 stages on each rank (a V), not v={v}; use v=2.")
    if v > 1 and key not in VIRTUAL:
        raise ScheduleError(f"v={v} virtual stages per rank needs schedule 'interleaved', "
                            f"'interleaved-zb' or (v=2) 'zb-v'; {key!r} puts one stage on each rank, "
                            f"so use v=1.")
    if not train and key != "gpipe":
        raise ScheduleError(f"Forward-only (train=False) is the 'gpipe' schedule; {key!r} orders "
                            f"backward passes, so use 'gpipe' for inference.")
    if key in ("interleaved", "interleaved-zb") and m % _rounds(p, m):
        low = next(k for k in range(m - 1, 0, -1) if not k % _rounds(p, k))
        high = next(k for k in range(m + 1, 2 * m + p + 1) if not k % _rounds(p, k))
        raise ScheduleError(f"The {key} schedule runs micro-batches in max(1, m // p) rounds of equal "
                            f"size (as PyTorch does), and m={m} with p={p} does not divide into "
                            f"{_rounds(p, m)} rounds: use m={low} or m={high}.")
    return key


def _rounds(p: int, m: int) -> int:
    return max(1, m // p)


def _one_f_one_b(fwd: list[Op], bwd: list[Op], warmup: int) -> tuple[Op, ...]:
    """``warmup`` forwards, then alternate one forward and one backward, then the remaining backwards."""
    warmup = min(warmup, len(fwd))
    out = fwd[:warmup]
    for k in range(len(fwd) - warmup):
        out += [fwd[warmup + k], bwd[k]]
    return tuple(out + bwd[len(fwd) - warmup:])


def gpipe(p: int, m: int, train: bool = True) -> Schedule:
    """GPipe: every rank runs all m forwards, then (if ``train``) all m backwards in ascending
    micro-batch order (as torch.distributed.pipelining's ScheduleGPipe; the bubble is the same
    either way). Every rank stashes all m activations."""
    _check("gpipe", p, m, 1, train)
    ranks = tuple(tuple(Op("F", r, j) for j in range(m)) + tuple(Op("B", r, j) for j in range(m) if train)
                  for r in range(p))
    return Schedule("gpipe", p, m, 1, ranks, train)


def one_f_one_b(p: int, m: int) -> Schedule:
    """PipeDream-flush 1F1B: rank r runs min(p-r-1, m) warm-up forwards, then alternates F and B, so at
    most min(p-r, m) activations are stashed; same bubble as GPipe."""
    _check("1f1b", p, m)
    ranks = tuple(_one_f_one_b([Op("F", r, j) for j in range(m)], [Op("B", r, j) for j in range(m)],
                               p - r - 1) for r in range(p))
    return Schedule("1f1b", p, m, 1, ranks, True)


def interleaved(p: int, m: int, v: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. SC21) with ``v`` model chunks per rank, in
    PyTorch's form (ScheduleInterleaved1F1B), which also takes micro-batch counts that are not a
    multiple of ``p``.

    Micro-batches go in ``max(1, m // p)`` rounds of ``k = m // rounds`` (ScheduleError when they do
    not divide evenly): forwards run chunk 0 of a round's k micro-batches, then chunk 1, ...;
    backwards run the chunks in reverse. Warm-up is ``(v - 1) * k + 2 * (p - r - 1)`` forwards
    (capped at m * v); with ``m % p == 0`` that is Megatron's ``2 * (p - r - 1) + (v - 1) * p``.
    With v == 1 this is plain 1F1B (Megatron-LM falls back to its non-interleaved schedule too).
    """
    _check("interleaved", p, m, v)
    if v == 1:
        return Schedule("interleaved", p, m, 1, one_f_one_b(p, m).ranks, True)
    k = m // _rounds(p, m)
    ranks = tuple(_interleaved_rank(p, m, v, r, min((v - 1) * k + 2 * (p - r - 1), m * v), k, False)
                  for r in range(p))
    return Schedule("interleaved", p, m, v, ranks, True)


def interleaved_zb(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved 1F1B with each B split into I and W (PyTorch's ScheduleInterleavedZeroBubble,
    the ZB1P schedule of Qi et al.): warm-up ``(v - 1) * k + (p - r - 1)`` forwards, and rank r
    defers each W by r backwards, filling the cool-down with them."""
    _check("interleaved-zb", p, m, v)
    k = m // _rounds(p, m)
    ranks = tuple(_interleaved_rank(p, m, v, r, min((v - 1) * k + (p - r - 1), m * v), k, True)
                  for r in range(p))
    return Schedule("interleaved-zb", p, m, v, ranks, True)


def _interleaved_rank(p: int, m: int, v: int, r: int, warmup: int, k: int, split: bool) -> tuple[Op, ...]:
    """One rank of the interleaved schedules (PyTorch's ``_get_1f1b_rank_ops``): ``warmup``
    forwards, then F/B pairs, then the remaining Bs; the n-th forward is on chunk ``(n // k) % v``,
    the n-th backward on chunk ``v - 1 - (n // k) % v``, each chunk's micro-batches in order. With
    ``split``, each B is an I, and the W of the n-th backward follows the (n + r)-th (the rest
    at the end)."""
    def fwd_stage(n: int) -> int:
        return (n // k) % v * p + r

    def bwd_stage(n: int) -> int:
        return (v - 1 - (n // k) % v) * p + r

    nxt = {"F": [0] * (p * v), "B": [0] * (p * v), "W": [0] * (p * v)}

    def take(kind: str, stage: int) -> Op:
        mb = nxt[kind][stage]
        nxt[kind][stage] += 1
        return Op("I" if kind == "B" and split else kind, stage, mb)

    ops: list[Op] = []
    backs: list[int] = []  # the n of each backward, in order, for their Ws
    total = m * v
    for n in range(warmup + total):
        if n < total:
            ops.append(take("F", fwd_stage(n)))
        if n >= warmup:
            b = n - warmup
            ops.append(take("B", bwd_stage(b)))
            backs.append(b)
            if split and b >= r:
                ops.append(take("W", bwd_stage(backs[b - r])))
    if split:
        ops += [take("W", bwd_stage(b)) for b in backs[max(0, len(backs) - r):]]
    return tuple(ops)


def zb_v(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al., ICLR 2024, section 6; PyTorch's ScheduleZBVZeroBubble): two stages per
    rank in a V (rank r holds stages r and 2p - 1 - r, so the last stage is on rank 0 and the
    loss needs no hop), each backward split into I and W. About half ZB-H1's bubble for the
    same activation memory when F, I and W cost the same. Built for ``max(m, 2p - 1)``
    micro-batches, as PyTorch does, then trimmed to ``m``."""
    _check("zb-v", p, m, 2)
    n = max(2 * p - 1, m)
    ranks = []
    for r in range(p):
        c0, c1 = r, 2 * p - 1 - r
        f0 = f1 = b0 = b1 = 0
        ops: list[Op] = []
        for _ in range(2 * (p - r) - 1):
            ops.append(Op("F", c0, f0)); f0 += 1
        for _ in range(r):
            ops += [Op("F", c1, f1), Op("F", c0, f0)]; f1 += 1; f0 += 1
        for _ in range(p - r):
            ops += [Op("F", c1, f1), Op("I", c1, b1), Op("W", c1, b1)]; f1 += 1; b1 += 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                ops.append(Op("F", c0, f0)); f0 += 1
            ops += [Op("I", c0, b0), Op("W", c0, b0)]; b0 += 1
            ops += [Op("F", c1, f1), Op("I", c1, b1), Op("W", c1, b1)]; f1 += 1; b1 += 1
        w0, w1 = b0, b1
        for _ in range(r):
            ops += [Op("I", c0, b0), Op("I", c1, b1)]; b0 += 1; b1 += 1
        for _ in range(p - r):
            ops += [Op("I", c0, b0), Op("W", c0, w0)]; b0 += 1; w0 += 1
        ops += [Op("W", c1, j) for j in range(w1, b1)] + [Op("W", c0, j) for j in range(w0, b0)]
        ranks.append(tuple(op for op in ops if op.mb < m))
    placement = tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))
    return Schedule("zb-v", p, m, 2, tuple(ranks), True, placement)


def zb_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. ICLR 2024): 1F1B with each B split into I and W.

    Rank r keeps 1F1B's forward/I order (same warm-up, so the same activation stash) and runs each
    W(j) r slots late, after I(j + r): that keeps p micro-batches in flight on every rank (the 1F1B
    maximum, reached on rank 0 only), and the late Ws fill the cool-down bubbles while the Is, now
    cheaper than a B, bring the gradients down sooner. The remaining Ws run at the end.
    """
    _check("zb-h1", p, m)
    ranks = []
    for r in range(p):
        core = _one_f_one_b([Op("F", r, j) for j in range(m)], [Op("I", r, j) for j in range(m)], p - r - 1)
        ops: list[Op] = []
        for op in core:
            ops.append(op)
            if op.kind == "I" and op.mb >= r:
                ops.append(Op("W", r, op.mb - r))
        ops += [Op("W", r, j) for j in range(max(0, m - r), m)]
        ranks.append(tuple(ops))
    return Schedule("zb-h1", p, m, 1, tuple(ranks), True)


def build(name: str, p: int, m: int, v: int = 1, train: bool = True) -> Schedule:
    """The schedule ``name`` (one of :data:`NAMES`) for p ranks, m micro-batches, v virtual stages
    (``zb-v`` always has 2: v=1 means that)."""
    if canonical(name) == "zb-v" and v == 1:
        v = 2  # the only placement it has: v defaults to 1 for every other schedule
    key = _check(name, p, m, v, train)
    if key == "gpipe":
        return gpipe(p, m, train)
    if key == "1f1b":
        return one_f_one_b(p, m)
    if key == "interleaved":
        return interleaved(p, m, v)
    if key == "interleaved-zb":
        return interleaved_zb(p, m, v)
    return zb_v(p, m) if key == "zb-v" else zb_h1(p, m)


# ----------------------------------------------------------------------------------------------------
# Validation and simulation: one dependency-driven executor serves both.


def _split(s: Schedule) -> bool:
    return any(op.kind in "IW" for ops in s.ranks for op in ops)


def _deps(op: Op, n_stages: int, split: bool) -> tuple[Op, ...]:
    """The ops ``op`` waits for (all on this or a neighbouring stage)."""
    if op.kind == "F":
        return (Op("F", op.stage - 1, op.mb),) if op.stage > 0 else ()
    if op.kind == "W":
        return (Op("I", op.stage, op.mb),)
    down = (Op("I" if split else "B", op.stage + 1, op.mb),) if op.stage < n_stages - 1 else ()
    return (Op("F", op.stage, op.mb),) + down


def _names(ops: list[Op], s: Schedule, limit: int = 6, stage: bool = False) -> str:
    shown = ", ".join(op.label(stage or s.v > 1) for op in ops[:limit])
    return shown + (f" and {len(ops) - limit} more" if len(ops) > limit else "")


def _check_ops(s: Schedule) -> None:
    """Every (stage, mb) has exactly the ops it should, each once, on the rank that holds the stage."""
    if min(s.p, s.m, s.v) < 1:
        raise ScheduleError(f"Schedule {s.name!r} has p={s.p}, m={s.m}, v={s.v}; all must be >= 1.")
    if len(s.ranks) != s.p:
        raise ScheduleError(f"Schedule {s.name!r} lists {len(s.ranks)} ranks but p={s.p}; give one op "
                            f"list per rank.")
    split = _split(s)
    seen: set[Op] = set()
    for r, ops in enumerate(s.ranks):
        for op in ops:
            if op.kind not in KINDS or not 0 <= op.stage < s.stages or not 0 <= op.mb < s.m:
                raise ScheduleError(f"Rank {r} has op {op!r}, which is not an F, B, I or W of a stage in "
                                    f"0..{s.stages - 1} and a micro-batch in 0..{s.m - 1}.")
            if s.rank_of(op.stage) != r:
                where = "its placement says" if s.placement else "stage s is on rank s % p"
                raise ScheduleError(f"{op.label(True)} is listed on rank {r} but stage {op.stage} lives "
                                    f"on rank {s.rank_of(op.stage)} ({where}); move it there.")
            if op in seen:
                raise ScheduleError(f"{op.label(True)} appears twice; each op must run exactly once.")
            seen.add(op)
    kinds = ("F",) + (() if not s.train else ("I", "W") if split else ("B",))
    if s.train and split and any(op.kind == "B" for op in seen):
        raise ScheduleError(f"Schedule {s.name!r} mixes B with I/W; split every backward or none.")
    extra = sorted((op for op in seen if op.kind not in kinds), key=lambda o: (o.mb, o.stage))
    if extra:
        raise ScheduleError(f"Schedule {s.name!r} has train={s.train} but lists {_names(extra, s)}; "
                            f"remove them or set train.")
    missing = [Op(k, st, j) for j in range(s.m) for st in range(s.stages) for k in kinds]
    missing = [op for op in missing if op not in seen]
    if missing:
        raise ScheduleError(f"Schedule {s.name!r} never runs {_names(missing, s)}; every stage needs "
                            f"these for every micro-batch.")


def _execute(s: Schedule, costs: Costs) -> list[Span]:
    """Run each rank's list in order; an op starts when its rank is free and its inputs have arrived
    (``comm`` later if produced on another rank). The start times do not depend on the order in which
    we visit ranks, so any sweep order gives the same answer. Raises ScheduleError on deadlock."""
    n, split = s.stages, _split(s)
    ends: dict[Op, float] = {}
    pos, free = [0] * s.p, [0.0] * s.p
    spans: list[Span] = []
    progressed = True
    while progressed:
        progressed = False
        for r, ops in enumerate(s.ranks):
            while pos[r] < len(ops):
                op = ops[pos[r]]
                deps = _deps(op, n, split)
                if any(d not in ends for d in deps):
                    break
                start = max([free[r]] + [ends[d] + (costs.comm if s.rank_of(d.stage) != r else 0.0)
                                         for d in deps])
                free[r] = ends[op] = start + costs.of(op, s.v)
                spans.append(Span(r, op, start, free[r]))
                pos[r] += 1
                progressed = True
    stuck = [(r, ops[pos[r]]) for r, ops in enumerate(s.ranks) if pos[r] < len(ops)]
    if stuck:
        parts = [f"rank {r} is stuck at {op.label(True)} waiting for "
                 f"{_names([d for d in _deps(op, n, split) if d not in ends], s, stage=True)}"
                 for r, op in stuck]
        raise ScheduleError(f"Schedule {s.name!r} deadlocks: {'; '.join(parts)}; reorder the ops so that "
                            f"each one's inputs are produced earlier.")
    return spans


def validate(s: Schedule) -> None:
    """Raise ScheduleError unless every op is present once on the right rank and the ranks, each
    running its list in order, can finish (no op waits forever for another)."""
    _check_ops(s)
    _execute(s, Costs())


def _stash(s: Schedule, r: int, until: str) -> int:
    """Peak count, walking rank r's list, of micro-batches forwarded whose ``until`` op is not done."""
    held = peak = 0
    for op in s.ranks[r]:
        held += op.kind == "F"
        peak = max(peak, held)
        held -= op.kind in until
    return peak


def simulate(s: Schedule, costs: Costs = Costs()) -> Simulation:
    """Validate ``s`` and time it: each rank runs its list in order, each op starting at
    ``max(rank free, each input's end + comm if made on another rank)``."""
    _check_ops(s)
    if costs.stages and len(costs.stages) != s.stages:
        raise ScheduleError(f"The costs give {len(costs.stages)} stages' op times but schedule "
                            f"{s.name!r} has {s.stages} stages; give one (F, B, I, W) per stage.")
    spans = _execute(s, costs)  # raises on deadlock, as validate() does
    makespan = max((sp.end for sp in spans), default=0.0)
    busy = [sum(sp.end - sp.start for sp in spans if sp.rank == r) for r in range(s.p)]
    idle = bubble(((sp.start, sp.end) for sp in spans), s.p)  # every schedule starts at 0
    return Simulation(tuple(spans), makespan, idle, tuple(_stash(s, r, "BI") for r in range(s.p)),
                      tuple(busy), tuple(_stash(s, r, "BW") for r in range(s.p)))


def comms(s: Schedule) -> tuple[tuple[Action, ...], ...]:
    """Each rank's list with the transfers a runtime must make: a Send right after the op that
    produces an activation (F) or input gradient (B/I) for a stage on another rank, a Recv right
    before the op that consumes it. Transfers between stages on the same rank are left implicit."""
    n, out = s.stages, []
    for r, ops in enumerate(s.ranks):
        acts: list[Action] = []
        for op in ops:
            if op.kind == "W":  # weight gradients stay where the weights are
                acts.append(op)
                continue
            # F reads an activation from stage s-1 and writes one to s+1; B/I move gradients the other way.
            what, back = ("act", -1) if op.kind == "F" else ("grad", 1)
            src, dst = op.stage + back, op.stage - back
            if 0 <= src < n and s.rank_of(src) != r:
                acts.append(Recv(what, op.stage, src, op.mb, s.rank_of(src)))
            acts.append(op)
            if 0 <= dst < n and s.rank_of(dst) != r:
                acts.append(Send(what, op.stage, dst, op.mb, s.rank_of(dst)))
        out.append(tuple(acts))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------
# Theory and drawing


def bubble(spans: Iterable[tuple[float, float]], ranks: int) -> float:
    """The idle share of ``ranks`` engines' time from the first span's start to the last span's end:
    ``1 - busy / (ranks * (end - start))``, where ``busy`` sums the ``(start, end)`` spans in the
    order given (ops on one engine run one after another, so they do not overlap). 0.0 when no
    time passed. The one bubble formula: measured runs, their views and simulations all use it.

    >>> bubble([(0, 1), (1, 2)], ranks=2)
    0.5
    >>> bubble([(0, 3), (0, 1), (1, 3)], ranks=2), bubble([], ranks=4)
    (0.0, 0.0)
    """
    t0, t1, busy, any_span = math.inf, -math.inf, 0.0, False
    for a, b in spans:
        t0, t1, busy, any_span = min(t0, a), max(t1, b), busy + (b - a), True
    total = ranks * (t1 - t0) if any_span else 0.0
    return max(0.0, 1.0 - busy / total) if total > 0 else 0.0


def theoretical_bubble(name: str, p: int, m: int, v: int = 1, costs: Costs = Costs()) -> float | None:
    """The bubble fraction (idle / total rank-time, as :attr:`Simulation.bubble`) from the literature's
    closed forms, for free communication and equal stages; None where no closed form applies (then use
    ``simulate(build(...), costs).bubble``). With ideal time ``T = m * (per-micro-batch work)`` and bubble
    time ``t``, it returns ``t / (T + t)``:

    - gpipe, 1f1b: ``t = (p-1)(F+B)``, so ``(p-1)/(m+p-1)`` whatever F and B (forward-only gpipe too).
    - interleaved: Narayanan et al.'s ``t/T = (p-1)/(v m)``, so ``(p-1)/(v m + p-1)``.
    - zb-h1: Qi et al.'s ``t = (p-1)(T_F + T_B - T_W)``, where their T_B is our ``I`` (input gradient)
      and ``T_W`` our ``W``; stated for ``m >= p`` and ``W <= F, W <= I`` (None otherwise).
    """
    key = _check(name, p, m, 2 if canonical(name) == "zb-v" and v == 1 else v)
    if costs.comm or key in ("interleaved-zb", "zb-v"):
        return None
    if key == "interleaved" and m % p:
        return None  # Narayanan et al. assume whole rounds of p micro-batches
    if key in ("gpipe", "1f1b", "interleaved"):
        return (p - 1) / (v * m + p - 1)
    if m < p or costs.w > min(costs.f, costs.i):
        return None
    t = (p - 1) * (costs.f + costs.i - costs.w)
    return t / (m * (costs.f + costs.i + costs.w) + t)


def _timeline(s: Schedule, sim: Simulation, width: int) -> list[str]:
    cols = max(10, width - len(f"r{s.p - 1} |") - 1)
    # Whole columns per step between event times when that fits, so equal ops get equal widths.
    times = sorted({round(t, 9) for sp in sim.spans for t in (0.0, sp.start, sp.end)})
    step = min(b - a for a, b in zip(times, times[1:]))
    per = min(4, int(cols * step / sim.makespan))
    scale = step / per if per >= 1 else sim.makespan / cols
    rows = []
    for r in range(s.p):
        row = ["."] * math.floor(sim.makespan / scale + 0.5)
        for sp in (x for x in sim.spans if x.rank == r):
            # floor(x + 0.5), not round(): banker's rounding would let neighbours overlap.
            c0 = math.floor(sp.start / scale + 0.5)
            c1 = max(c0 + 1, math.floor(sp.end / scale + 0.5))
            text = str(sp.op) if len(str(sp.op)) <= c1 - c0 else sp.op.kind
            cells = (text + "-" * (c1 - c0))[: c1 - c0]
            row[c0:c1] = cells
        rows.append(f"r{r:<{len(str(s.p - 1))}} |{''.join(row)}|")
    return [f"timeline (one column = {scale:.3g} time units, '.' idle):"] + rows


def render(s: Schedule, sim: Simulation | None = None, width: int = 100) -> str:
    """A text picture: a header, one line per rank listing its ops (wrapped at ``width``), makespan,
    bubble and peak stash (simulated with default :class:`Costs` unless ``sim`` is given), and, when
    ``sim`` is given, an ASCII timeline with one row per rank."""
    stats = sim if sim is not None else simulate(s)
    mode = "training" if s.train else "forward only"
    where = ("stages in a V: rank r holds r and 2p-1-r" if s.name == "zb-v" and s.placement
             else "placement " + " ".join(map(str, s.placement)) if s.placement else "stage s on rank s % p")
    lines = textwrap.wrap(f"{s.name} ({mode}): p={s.p} ranks, v={s.v} stages per rank, m={s.m} "
                          f"micro-batches; {where}", width)
    pad = len(str(s.p - 1))
    for r, ops in enumerate(s.ranks):
        head = f"r{r:<{pad}}: "
        lines += textwrap.wrap(" ".join(op.label(s.v > 1) for op in ops) or "(nothing)", width,
                               initial_indent=head, subsequent_indent=" " * len(head))
    theory = None
    if sim is None and s.name in NAMES:  # hand-made schedules have no closed form
        try:
            theory = theoretical_bubble(s.name, s.p, s.m, s.v)
        except ScheduleError:
            pass
    lines += textwrap.wrap(f"makespan {stats.makespan:g}, bubble {stats.bubble:.1%}"
                           + (f" (theory {theory:.1%})" if theory is not None else "")
                           + f", peak stash per rank {' '.join(map(str, stats.peak_stash))}", width)
    if sim is not None and sim.makespan > 0:
        lines += _timeline(s, sim, width)
    return "\n".join(lines)
