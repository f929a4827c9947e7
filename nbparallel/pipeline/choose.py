"""Which schedule to run, from op costs. Pure (stdlib only).

The runtime measures every op of a run; :func:`measured` turns those spans into per-stage op
costs, :func:`compare` simulates schedules side by side for costs (measured or given), and
:func:`pick` chooses one for ``%pipeline train --schedule auto``: the smallest simulated makespan
among the schedules the stages can run, under an activation budget. In a notebook, without
running anything::

    %pipeline schedule --stages 4 --microbatches 8 --compare --costs "f=1 b=2 i=1 w=1 comm=0.2"

>>> rows = compare(4, 8, schedule.Costs())
>>> [r.name for r in rows][:3]
['gpipe', '1f1b', 'interleaved']
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import schedule
from .schedule import KINDS, NAMES, SPLIT, VIRTUAL, Costs, Schedule, ScheduleError, Send

__all__ = ["Row", "measured", "compare", "table", "pick", "parse_costs"]


@dataclass(frozen=True)
class Row:
    """One schedule simulated: ``peak`` is the most activations an engine holds at once, in
    micro-batches of all its layers (a stage of v per engine holds 1/v of them; with the
    zero-bubble split, until the W that needs them), ``sends`` the transfers between engines in
    one step. ``refused`` says why it was not built."""

    name: str
    v: int
    makespan: float = 0.0
    bubble: float = 0.0
    peak: float = 0.0
    sends: int = 0
    refused: str = ""


def measured(s: Schedule, spans: Iterable[Sequence]) -> Costs:
    """Per-stage op costs of a run: the median duration of each kind on each stage, from spans
    ``(rank, kind, stage, mb, start, end)``. Kinds the run did not have are derived from those it
    had: ``B = I + W`` after a split run, ``I = W = B / 2`` after a plain one (which cannot tell
    them apart). Communication is folded into the ops (a send is timed inside the op that makes
    its value), so ``comm`` is 0."""
    times: dict[tuple[int, str], list[float]] = {}
    for _, kind, stage, _, start, end in spans:
        times.setdefault((stage, kind), []).append(end - start)
    rows = []
    for stage in range(s.stages):
        f, b, i, w = (statistics.median(times[stage, k]) if (stage, k) in times else None
                      for k in KINDS)
        if b is None:
            b = (i or 0.0) + (w or 0.0)
        if i is None or w is None:
            i = w = b / 2
        rows.append((f or 0.0, b, i, w))
    return Costs(stages=tuple(rows))


def _row(name: str, p: int, m: int, v: int, costs: Costs) -> Row:
    try:
        s = schedule.build(name, p, m, v)
        sim = schedule.simulate(s, costs)
    except ScheduleError as exc:
        return Row(name, v, refused=str(exc))
    peak = max(sim.peak_inflight if name in SPLIT else sim.peak_stash) / s.v
    sends = sum(isinstance(a, Send) for acts in schedule.comms(s) for a in acts)
    return Row(name, s.v, sim.makespan, sim.bubble, peak, sends)


def compare(p: int, m: int, costs: Costs = Costs(), names: Sequence[str] = NAMES,
            v: int = 2) -> list[Row]:
    """Every schedule of ``names`` for ``p`` engines and ``m`` micro-batches, simulated with
    ``costs`` (a whole engine's share per op; the interleaved ones with ``v`` stages per engine,
    zb-v with 2). Those that cannot be built say why."""
    return [_row(n, p, m, (2 if n == "zb-v" else v) if n in VIRTUAL else 1, costs) for n in names]


def table(rows: Sequence[Row], unit: str = "") -> str:
    """A text table of :func:`compare` rows, fastest first, with each makespan's ratio to the
    fastest."""
    built = sorted((r for r in rows if not r.refused), key=lambda r: r.makespan)
    best = built[0].makespan if built else 0.0
    lines = [f"{'schedule':<15} {'v':>2} {'makespan':>10} {'vs best':>8} {'bubble':>7} "
             f"{'peak act.':>9} {'sends':>6}"]
    for r in built:
        ratio = f"{r.makespan / best:.2f}x" if best > 0 else "-"
        lines.append(f"{r.name:<15} {r.v:>2} {r.makespan:>9.4g}{unit:<1} {ratio:>8} "
                     f"{r.bubble:>7.1%} {r.peak:>9.3g} {r.sends:>6}")
    if built:
        lines.append("peak act.: most micro-batches' activations an engine holds at once, counted "
                     "in its whole layers")
    lines += [f"{r.name:<15} not built: {r.refused}" for r in rows if r.refused]
    return "\n".join(lines)


def pick(candidates: Sequence[str], p: int, m: int, v: int, costs: Costs,
         max_stash: float | None = None) -> tuple[str, list[Row]]:
    """The candidate with the smallest simulated makespan for ``costs`` (per-stage, for ``v``
    stages per engine) whose peak activations stay within ``max_stash``; and every row, for
    saying why. Raises ScheduleError when none fits the budget."""
    rows = [_row(n, p, m, v, costs) for n in candidates]
    fits = [r for r in rows if not r.refused and (max_stash is None or r.peak <= max_stash)]
    if not fits:
        least = min((r for r in rows if not r.refused), key=lambda r: r.peak, default=None)
        raise ScheduleError(
            f"No schedule keeps within --max-stash {max_stash} activations per engine"
            + (f" (the least is {least.name} with {least.peak:g})" if least else "")
            + "; allow more, or use more micro-batches of fewer rows each.")
    return min(fits, key=lambda r: (r.makespan, r.peak)).name, rows


def parse_costs(text: str) -> Costs:
    """``"f=1 b=2 i=1 w=1 comm=0.1"`` (spaces or commas between, any subset) as :class:`Costs`;
    B defaults to I + W when only those are given."""
    values: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        key, sep, number = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("f", "b", "i", "w", "comm"):
            raise ScheduleError(f"--costs takes key=value pairs of f, b, i, w and comm (op times of "
                                f"an engine's share, e.g. \"f=1 b=2 comm=0.1\"), not {item!r}.")
        try:
            values[key] = float(number)
        except ValueError:
            values[key] = float("nan")
        if not 0 <= values[key] < float("inf"):
            raise ScheduleError(f"--costs {key}={number}: a time must be a number, 0 or more.")
    if "b" not in values and ("i" in values or "w" in values):
        values["b"] = values.get("i", 1.0) + values.get("w", 1.0)
    return Costs(**values)
