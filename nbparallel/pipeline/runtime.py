"""Model parallelism: stages on engines, micro-batches flowing between them under a schedule.

:class:`Pipeline` is the runtime, one per session; its Python twins (``pipeline/twins.py``)
are importable from :mod:`nbparallel.pipeline`, like ``%%stage`` and ``%pipeline``::

    from nbparallel import pipeline
    pipeline.stage("l1", STAGE_CELL_SOURCE)            # runs once on its engine
    pipeline.stage("l2", OTHER_STAGE_SOURCE)
    y = pipeline.run(x, microbatches=8)                # forward only (GPipe order)
    losses = pipeline.train(x, t, microbatches=8, schedule="1f1b", steps=3)
    pipeline.show()                                    # stages, engines, parameter bytes

A stage cell defines ``forward(x, ctx)`` and, to train, ``backward(grad, ctx)`` (or the split
``backward_input(grad, ctx)`` / ``backward_weight(ctx)`` for ``zb-h1``), ``loss(y, target)`` on the
last stage, and optionally ``step()``, called once per step after all micro-batches.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import config
from ..cellcode import free_names, pack_names, parse_cell
from ..dataplane import remote
from ..engine import stages as engine_stages
from ..engine.replies import RankReply
from ..errors import PoolError, RemoteError, RemoteFailure, UsageError
from ..format import ranges
from ..relay import Relay
from . import choose, schedule as sched

__all__ = ["StageInfo", "RunResult", "Pipeline"]

STAGE_TIMEOUT = 3600.0  # seconds a %%stage cell, a pull or a drop may take (Ctrl-C ends it sooner)


@dataclass(frozen=True)
class StageInfo:
    """One row of ``%pipeline show``."""

    name: str
    engine: int
    hooks: tuple[str, ...]
    param_bytes: int


@dataclass
class RunResult:
    """What one schedule run measured: per-op spans (rank, kind, stage, mb, start, end)."""

    schedule: sched.Schedule
    run: str = ""
    spans: list[tuple[int, str, int, int, float, float]] = field(default_factory=list)
    peak_stash: dict[int, int] = field(default_factory=dict)
    bytes_between_stages: int = 0

    @property
    def bubble(self) -> float:
        """Idle share of engine time between the first op's start and the last op's end."""
        return sched.bubble(((s[4], s[5]) for s in self.spans), self.schedule.p)

    @property
    def costs(self) -> sched.Costs:
        """Each stage's op times as this run measured them (medians; see ``choose.measured``)."""
        return choose.measured(self.schedule, ((r, k, st, j, a, b) for r, k, st, j, a, b in self.spans))

    @property
    def theory(self) -> float:
        """The bubble the schedule should have had with the op times this run measured: its
        simulation for :attr:`costs` (uneven stages make a bubble no schedule removes)."""
        if not self.spans:
            return self.theory_equal
        return sched.simulate(self.schedule, self.costs).bubble

    @property
    def theory_equal(self) -> float:
        """The schedule's bubble fraction for equal stages and free communication."""
        s = self.schedule
        if s.train:
            value = sched.theoretical_bubble(s.name, s.p, s.m, s.v)
            if value is not None:
                return value
        return sched.simulate(s).bubble  # forward-only runs, virtual stages included


class Pipeline:
    """The stages defined on one pool, in definition order (stage 0 first).

    Built beside the pool by the session: ``pool`` runs the stages, ``plane`` gives their
    engines' channels and whether they share this host, ``monitor`` records the runs.
    """

    def __init__(self, pool: Any, plane: Any, monitor: Any):
        self.pool = pool
        self.plane = plane
        self.monitor = monitor
        self.stages: dict[str, StageInfo] = {}
        self.last: list[RunResult] = []
        #: Large activations between engines of this host go through shared memory; False sends
        #: them over the signed sockets instead (``nbparallel bench`` compares the two).
        self.handoff = True

    # -- stages --------------------------------------------------------------------------------
    def define(self, name: str, code: str, engine: int | None, namespace: Mapping[str, Any],
               hidden: Sequence[str] = ()) -> StageInfo:
        if not name.isidentifier():
            raise UsageError(f"stage name {name!r} is not a valid Python name; try `%%stage l1`.")
        cell, tree = parse_cell(code, f"%%stage {name} cell")
        free = free_names(tree)
        if "comm" in free and "comm" not in namespace:
            raise UsageError(
                f"`comm` is not defined in %%stage {name}: a stage runs on one engine, and the "
                f"collectives between the engines of a tensor-parallel stage are not built yet. "
                f"Use %%scatter for a cell whose engines talk to each other.")
        blob = pack_names(free, namespace, skip={"xp", *hidden},
                          too_big="Build `{name}` inside the %%stage cell instead (for example "
                                  "initialise or load the parameters there): it stays on the "
                                  "stage's engine.")
        ids = self.pool.ids
        if engine is None:
            index = list(self.stages).index(name) if name in self.stages else len(self.stages)
            engine = ids[index % len(ids)]
        elif engine not in ids:
            raise UsageError(f"--engine {engine} is not in the pool; available: {ids}.")
        reply = self._call(engine, engine_stages.define, name, cell, blob, what="its stage cell")
        if not reply.ok:
            raise RemoteError(f"the %%stage {name} cell", [replace(reply.failure, engine=engine)])
        if "forward" not in reply.hooks:
            raise UsageError(
                f"stage `{name}` does not define forward(x, ctx); every stage needs one, e.g.\n"
                f"    def forward(x, ctx):\n        ctx['x'] = x\n        return x @ W"
            )
        old = self.stages.get(name)
        if old is not None and old.engine != engine and self.pool.alive([old.engine]):
            self._call(old.engine, engine_stages.drop, [name], what="the old stage to go")
        info = StageInfo(name, engine, reply.hooks, reply.param_bytes)
        self.stages[name] = info  # re-running a stage keeps its place in the order
        return info

    def placement(self) -> tuple[list[int], int, bool]:
        """The engines (ranks) in stage order, the number of virtual stages per rank, and
        whether the stages form a V (rank r holds stages r and 2p-1-r, for zb-v) rather than
        going round-robin (stage s on rank s mod p)."""
        if not self.stages:
            raise UsageError("no stages yet: define them with %%stage NAME cells, first to last.")
        engines = [info.engine for info in self.stages.values()]
        live = set(self.pool.alive(engines))
        lost = [(info.name, info.engine) for info in self.stages.values() if info.engine not in live]
        if lost:
            names = ", ".join(f"`{n}` (engine {e})" for n, e in lost)
            raise PoolError(
                f"stage(s) {names} lived on an engine that has stopped, and their parameters "
                f"with it. Define them again on a live engine (`%%stage NAME --engine K`, K one "
                f"of {ranges(self.pool.ids)}), or `%pipeline clear` and start over."
            )
        ranks = list(dict.fromkeys(engines))
        p = len(ranks)
        vee = len(engines) == 2 * p and engines == ranks + ranks[::-1]
        if not vee and (len(engines) % p or any(engines[s] != ranks[s % p]
                                                for s in range(len(engines)))):
            raise UsageError(
                f"stages sit on engines {engines}; with more stages than engines they must go "
                f"round-robin (stage s on engine s mod {p}, for the interleaved schedules) or, "
                f"two per engine, in a V ({ranks + ranks[::-1]}, for zb-v). Drop --engine from the "
                f"%%stage lines to get round-robin, or give each stage its --engine."
            )
        return ranks, len(engines) // p, vee and p > 1

    # -- running -------------------------------------------------------------------------------
    def run(self, x: Any, microbatches: int, dashboard: bool | None = None) -> Any:
        ranks, v, vee = self.placement()
        s = _forward_only(len(ranks), microbatches, v, vee)
        result = self._execute(s, ranks, _split(x, microbatches, "--input"), {}, False, dashboard)
        return _join(result["outputs"], microbatches)

    def train(self, x: Any, target: Any, microbatches: int, schedule: str, steps: int,
              dashboard: bool | None = None, max_stash: float | None = None,
              say: Callable[[str], None] = print) -> list[float]:
        """``steps`` synchronous training steps under ``schedule``; their losses.

        ``schedule="auto"`` runs the first step with a schedule these stages can always run
        (1F1B, or its interleaved / V / zero-bubble form), then the rest with the one whose
        simulation for the op times that step measured is fastest, keeping at most
        ``max_stash`` micro-batches' activations per engine; ``say`` gets which and why.
        """
        ranks, v, vee = self.placement()
        auto = sched.canonical(schedule) == "auto"
        if max_stash is not None and not 0 < max_stash < float("inf"):
            raise UsageError(f"--max-stash must be a number of micro-batches above 0, not {max_stash:g}.")
        if auto:
            schedule = self._first_schedule(len(ranks), microbatches, v, vee, max_stash)
        if v > 1 and sched.canonical(schedule) not in sched.VIRTUAL:
            raise UsageError(
                f"{len(self.stages)} stages on {len(ranks)} engines are virtual stages; train them "
                f"with --schedule interleaved or interleaved-zb (zb-v for stages in a V), or give "
                f"each stage its own engine."
            )
        s = sched.build(schedule, len(ranks), microbatches, v)
        if v > 1 and (s.name == "zb-v") != vee:
            raise UsageError(
                f"{len(self.stages)} stages on engines {[i.engine for i in self.stages.values()]} "
                + ("form a V, which only --schedule zb-v runs; place them round-robin (no --engine "
                   "on the %%stage lines) for the interleaved schedules." if vee else
                   f"go round-robin; --schedule zb-v needs them in a V: stage s on engine "
                   f"{ranks + ranks[::-1]}[s] (`%%stage NAME --engine K`).")
            )
        self._check_hooks(s.name)
        xs, ts = _split(x, microbatches, "--input"), _split(target, microbatches, "--target")
        # Split alike, rows of different counts would pair each input with the wrong targets.
        if len(np.asarray(x)) != len(np.asarray(target)):
            raise UsageError(
                f"--input has {len(np.asarray(x))} rows but --target has "
                f"{len(np.asarray(target))}; row i of the target goes with row i of the input, "
                f"so they must have the same number of rows."
            )
        if steps < 1:
            raise UsageError(f"--steps must be 1 or more, not {steps}.")
        losses = []
        self.last = []
        for step in range(steps):
            result = self._execute(s, ranks, xs, ts, True, dashboard)
            losses.append(sum(result["losses"].values()))
            if auto and step == 0:
                s = self._auto(s, len(ranks), microbatches, v, vee, max_stash, steps, say)
        return losses

    def _candidates(self, v: int, vee: bool) -> list[str]:
        """The schedules ``--schedule auto`` may pick: those of this placement that the stages'
        hooks can run (a plain ``backward``, or the split pair), 1F1B's form first."""
        hooks = [set(info.hooks) for info in self.stages.values()]
        plain = all("backward" in h for h in hooks)
        split = all({"backward_input", "backward_weight"} <= h for h in hooks)
        names = (["zb-v"] if vee else ["interleaved", "interleaved-zb"] if v > 1
                 else ["1f1b", "zb-h1", "gpipe"])
        return [n for n in names if (n in sched.SPLIT and split) or (n not in sched.SPLIT and plain)]

    def _first_schedule(self, p: int, m: int, v: int, vee: bool, max_stash: float | None) -> str:
        """What ``--schedule auto`` runs its first step with: 1F1B's form for this placement,
        or, when that holds more than ``max_stash``, the candidate holding least. Activations
        held depend on the order alone, so a budget nothing meets fails before any step."""
        names = self._candidates(v, vee)
        if not names:
            return "1f1b"  # _check_hooks says what is missing
        if max_stash is None:
            return names[0]
        rows = [r for r in choose.compare(p, m, names=names, v=v) if not r.refused]
        fits = [r for r in rows if r.peak <= max_stash]
        if not fits:
            least = min(rows, key=lambda r: r.peak, default=None)
            raise UsageError(
                f"no schedule these stages can run keeps within --max-stash {max_stash:g} "
                f"micro-batches' activations per engine"
                + (f" (the least is {least.name}, {least.peak:g})" if least else "")
                + "; allow more, or use fewer, larger micro-batches.")
        return fits[0].name

    def _auto(self, first: sched.Schedule, p: int, m: int, v: int, vee: bool,
              max_stash: float | None, steps: int, say: Callable[[str], None]) -> sched.Schedule:
        """The schedule ``--schedule auto`` uses after the first step, said with its reasons."""
        names = self._candidates(v, vee)
        split = all({"backward_input", "backward_weight"} <= set(info.hooks)
                    for info in self.stages.values())
        costs = self.last[-1].costs
        name, rows = choose.pick(names, p, m, v, costs, max_stash)
        by = {r.name: r for r in rows if not r.refused}
        best = by[name]
        others = ", ".join(f"{r.name} {r.makespan * 1e3:.3g} ms" for r in
                           sorted(by.values(), key=lambda r: r.makespan) if r.name != name)
        guessed = "" if first.name in sched.SPLIT or not split else (
            " (I and W taken as half of each measured backward)")
        budget = f" within --max-stash {max_stash:g}" if max_stash is not None else ""
        say(f"%pipeline train --schedule auto: step 1 ran {first.name}; for the op times it "
            f"measured{guessed}, {name} simulates fastest: {best.makespan * 1e3:.3g} ms a step"
            + (f" against {others}" if others else "")
            + f", holding at most {best.peak:g} micro-batches' activations per engine{budget}. "
            + (f"Steps 2-{steps} use {name}." if steps > 1 else f"Later runs can use {name}."))
        return sched.build(name, p, m, v)

    def _check_hooks(self, schedule: str) -> None:
        infos = list(self.stages.values())
        split = schedule in sched.SPLIT
        need = ("backward_input", "backward_weight") if split else ("backward",)
        for info in infos:
            missing = [h for h in need if h not in info.hooks]
            if missing:
                extra = (f" {schedule} splits the backward pass: define backward_input(grad, ctx) "
                         "returning the input gradient and backward_weight(ctx) accumulating "
                         "the weight gradient." if split else "")
                raise UsageError(f"stage `{info.name}` lacks {', '.join(missing)}, which "
                                 f"training with --schedule {schedule} needs.{extra}")
        if "loss" not in infos[-1].hooks:
            raise UsageError(f"the last stage `{infos[-1].name}` must define loss(y, target) "
                             f"returning (value, gradient of the value with respect to y).")

    def _execute(self, s: sched.Schedule, ranks: list[int], xs: list[Any], ts: list[Any],
                 train: bool, dashboard: bool | None) -> dict[str, Any]:
        plane = self.plane
        names = list(self.stages)
        # Engines that all share this host's /dev/shm share each other's: hand off through it,
        # and their channels listen on loopback. Across hosts, on the cluster's network.
        one_host = all(plane.is_local(e) for e in ranks)
        endpoints = {i: plane.endpoint(self.stages[n].engine, cluster=not one_host)
                     for i, n in enumerate(names)}
        run_id = secrets.token_hex(6)
        last = len(names) - 1
        local = self.handoff and one_host
        owner = plane.arena.owner if local else None
        # Stages on GPU engines of this host pass CuPy arrays by CUDA IPC (dataplane/cudaipc.py).
        gpu_stages = frozenset(i for i, n in enumerate(names)
                               if local and config.cuda_ipc
                               and self.pool.info(self.stages[n].engine).get("gpu"))
        futures = []
        with self.monitor.watch("%pipeline", ranks, dashboard) as watch:
            watch.queued({eid: 1 for eid in ranks})
            for r, eid in enumerate(ranks):
                mine = {i: n for i, n in enumerate(names) if s.rank_of(i) == r}
                ops = [(op.kind, op.stage, op.mb) for op in s.ranks[r]]
                inputs = {j: x for j, x in enumerate(xs)} if 0 in mine else {}
                targets = {j: t for j, t in enumerate(ts)} if last in mine else {}
                futures.append(self.pool.apply(eid, engine_stages.run_rank, run_id, r, ops, mine,
                                               endpoints, len(names), inputs, targets, train,
                                               owner, gpu_stages))
                watch.follow(futures[-1], eid, run_id,
                             {i: self.stages[n].engine for i, n in enumerate(names)})
            replies = self._collect(futures, ranks, run_id, watch)
            result = RunResult(s, run_id)
            out: dict[str, Any] = {"outputs": {}, "losses": {}}
            for r, (fut, reply) in enumerate(zip(futures, replies)):
                out["outputs"].update(reply.outputs)
                out["losses"].update(reply.losses)
                result.spans += [(r, *span) for span in reply.spans]
                result.peak_stash.update(reply.peak_stash)
                result.bytes_between_stages += sum(reply.sent.values())
                watch.settle(fut, reply.spans, reply.sent)
            self.monitor.pipeline(run_id, s.name, result.theory, result.peak_stash)
        self.last.append(result)
        return out

    def _collect(self, futures: list[Any], ranks: list[int], run_id: str,
                 watch: Any) -> list[RankReply]:
        failed = True  # until the wait ends without a failure: Ctrl-C leaves it so
        relay = Relay()  # what the stages print shows while the run goes on

        def tick() -> None:
            watch.tick()
            relay.tick(futures, ranks)

        try:
            waited = self.pool.wait(futures, ranks, tick=tick, stop_if=_failed)
            failed = waited.stopped or any(_failed(f) for f in futures)
        finally:
            if failed:
                # What arrived for the run on the engines still alive will never be taken.
                for eid in self.pool.alive(ranks):
                    try:
                        self.pool.apply(eid, remote.discard_run, f"{run_id}:")
                    except PoolError:
                        pass  # it stopped just now: nothing of the run is left on it either
                for eid in ranks:
                    if not self.pool.alive([eid]):
                        self.plane.engine_gone(eid)
        failures = []
        replies = []
        for r, (eid, fut) in enumerate(zip(ranks, futures)):
            # What has arrived (the tick printed the rest while the run went on). Not
            # pool.relay_output: its wait for ipyparallel's idle message made a warm pipeline
            # make a second hand-off segment in 2 of 3 runs of test_pipeline.py (a sleep of the
            # same length did not; cause not found), so a line printed in the last instant of a
            # run may not show at all.
            relay.show(fut, eid, final=True)
            reply, failure = self.pool.outcome(fut, eid, rank=r)
            if failure is not None:
                if failure.ename not in ("KeyboardInterrupt", "TimeoutError"):  # stopped by us
                    failures.append(failure)
                continue
            if not reply.ok:
                failures.append(replace(reply.failure, engine=eid))
            replies.append(reply)
        if failures or failed:
            raise RemoteError("the pipeline", failures or [RemoteFailure(-1, "Interrupted",
                                                                          "the run was stopped",
                                                                          "")])
        return replies

    def show(self) -> list[StageInfo]:
        return list(self.stages.values())

    def pull(self, stage: str, var: str) -> Any:
        """Copy variable ``var`` of stage ``stage`` into the notebook (e.g. trained weights)."""
        if stage not in self.stages:
            raise UsageError(f"no stage named `{stage}`; stages: {', '.join(self.stages) or 'none'}.")
        return self._call(self.stages[stage].engine, engine_stages.pull, stage, var,
                          what=f"stage {stage}'s {var}")

    def clear(self) -> None:
        """Forget every stage, here and on the engines."""
        live = set(self.pool.alive([info.engine for info in self.stages.values()]))
        for info in self.stages.values():
            if info.engine in live:  # a stage on an engine that stopped went with it
                self._call(info.engine, engine_stages.drop, [info.name], what="the stage to go")
        self.stages.clear()

    def _call(self, engine: int, fn: Any, *args: Any, what: str) -> Any:
        # A stage cell may take long (it builds parameters): bounded, but generously.
        return self.pool.call(engine, fn, *args, timeout=STAGE_TIMEOUT, what=what)


def _failed(future: Any) -> bool:
    """Whether a rank's task failed: the others then wait for activations that never come."""
    if future.exception() is not None:
        return True
    return not future.result().ok


def _forward_only(p: int, m: int, v: int, vee: bool = False) -> sched.Schedule:
    """Inference order: each rank runs its stages first to last, each over every micro-batch
    (stages round-robin, or in a V: rank r holds r and 2p-1-r)."""
    sched.check_size(p, m, v)
    if v == 1:
        return sched.build("gpipe", p, m, train=False)
    placement = tuple(st if st < p else 2 * p - 1 - st for st in range(2 * p)) if vee else ()
    mine = ([(r, 2 * p - 1 - r) for r in range(p)] if vee else
            [tuple(range(r, p * v, p)) for r in range(p)])
    ranks = tuple(tuple(sched.Op("F", st, j) for st in mine[r] for j in range(m)) for r in range(p))
    return sched.Schedule("gpipe", p, m, v, ranks, False, placement)


def _split(x: Any, m: int, what: str) -> list[Any]:
    if m < 1:
        raise UsageError(f"--microbatches must be 1 or more, not {m}.")
    n = len(x)
    if n < m:
        raise UsageError(f"{what} has {n} rows, fewer than --microbatches {m}; use at most {n}.")
    # Like numpy.array_split: when m does not divide the batch, the first micro-batches are
    # one row longer. Losses are the user's, so scale them by the full batch if it matters.
    return list(np.array_split(np.asarray(x), m))


def _join(outputs: dict[int, Any], m: int) -> Any:
    parts = [outputs[j] for j in range(m)]
    return np.concatenate(parts) if all(isinstance(p, np.ndarray) for p in parts) else parts
