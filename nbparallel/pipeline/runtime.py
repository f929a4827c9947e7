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
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import config
from .. import precision as mixed
from ..cellcode import analyse, pack_names
from ..comm.setup import open_comm
from ..dataplane import remote
from ..engine import stages as engine_stages
from ..engine.replies import RankReply
from ..errors import PoolError, RemoteError, RemoteFailure, UsageError
from ..format import ranges
from ..relay import Relay
from ..telemetry.records import transfer
from . import checkpoint, choose, schedule as sched
from .layout import Layout

__all__ = ["StageInfo", "RunResult", "Pipeline"]

STAGE_TIMEOUT = 3600.0  # seconds a %%stage cell, a pull or a drop may take (Ctrl-C ends it sooner)
#: Resumptions from a checkpoint one ``train`` call makes after engines died, at most.
MAX_RESUMES = 3
RESUME_TIMEOUT = 60.0  # seconds to wait for a dead engine to be seen and replaced


@dataclass(frozen=True)
class StageInfo:
    """One row of ``%pipeline show``."""

    name: str
    engine: int
    hooks: tuple[str, ...]
    param_bytes: int
    #: The engines of a tensor-parallel stage, tensor rank order (``(engine,)`` otherwise).
    engines: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.engines:
            object.__setattr__(self, "engines", (self.engine,))


@dataclass
class RunResult:
    """What one schedule run measured: per-op spans (rank, kind, stage, mb, start, end)."""

    schedule: sched.Schedule
    run: str = ""
    spans: list[tuple[int, str, int, int, float, float]] = field(default_factory=list)
    peak_stash: dict[int, int] = field(default_factory=dict)
    bytes_between_stages: int = 0
    #: The engines of the run (stage x replica x tensor rank), and how long the slowest spent
    #: summing gradients over the replicas.
    layout: Any = None
    reduce_seconds: float = 0.0
    skipped: bool = False
    #: Bytes the tensor-parallel and replica comms moved (in the comm matrix as ``comm``).
    comm_bytes: int = 0

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
        self._sources: dict[str, tuple[Any, bytes]] = {}
        self._synced: Any = None  # the layout whose replicas equal replica 0, if any
        self._comms: dict[Any, Any] = {}  # the last run's comms, kept for the next of its layout
        self._comms_key: Any = None
        #: The fp16 loss scale carried from one run to the next (``precision.LossScaler``).
        self.scaler: Any = None
        #: The session's ``heal`` (replace dead engines; old -> new), for resuming a run.
        self.heal: Callable[[Callable[[str], None]], dict[int, int]] | None = None
        #: Large activations between engines of this host go through shared memory; False sends
        #: them over the signed sockets instead (``nbparallel bench`` compares the two).
        self.handoff = True

    # -- stages --------------------------------------------------------------------------------
    def define(self, name: str, code: str, engine: int | None, namespace: Mapping[str, Any],
               hidden: Sequence[str] = (), engines: Sequence[int] | None = None) -> StageInfo:
        """Run stage ``name``'s cell on its engine, or on each engine of ``engines`` (a tensor
        parallel stage: the cell gets ``comm`` spanning them, ``tp_rank`` and ``tp_size``)."""
        if not name.isidentifier():
            raise UsageError(f"stage name {name!r} is not a valid Python name; try `%%stage l1`.")
        group = self._group(name, engine, engines)
        cell, free = analyse(code, f"%%stage {name} cell")
        if "comm" in free and "comm" not in namespace and len(group) == 1:
            raise UsageError(
                f"`comm` is not defined in %%stage {name}: a stage on one engine has no other "
                f"engines to talk to. Spread it over several for tensor parallelism "
                f"(`%%stage {name} --engines 0,1`: the cell gets `comm`, `tp_rank` and "
                f"`tp_size`), or use %%scatter for a cell whose engines talk to each other.")
        blob = pack_names(free, namespace, skip={"xp", "comm", "tp_rank", "tp_size", *hidden},
                          too_big="Build `{name}` inside the %%stage cell instead (for example "
                                  "initialise or load the parameters there): it stays on the "
                                  "stage's engine.")
        hooks, nbytes = self._run_cell(name, cell, blob, group)
        if "forward" not in hooks:
            self._call_each(group, engine_stages.drop, [name], what="the stage to go")
            raise UsageError(
                f"stage `{name}` does not define forward(x, ctx); every stage needs one, e.g.\n"
                f"    def forward(x, ctx):\n        ctx['x'] = x\n        return x @ W"
            )
        old = self.stages.get(name)
        if old is not None:
            gone = [e for e in old.engines if e not in group]
            self._call_each(self.pool.alive(gone), engine_stages.drop, [name],
                            what="the old stage to go")
        info = StageInfo(name, group[0], hooks, nbytes, group)
        self.stages[name] = info  # re-running a stage keeps its place in the order
        self._sources[name] = (cell, blob)
        self._synced = None  # replicas run the new cell afresh before the next data-parallel run
        self.scaler = None  # a new model starts from fp16's initial loss scale
        self._drop_comms()
        return info

    def _group(self, name: str, engine: int | None, engines: Sequence[int] | None) -> tuple[int, ...]:
        ids = self.pool.ids
        if engines is not None and engine is not None:
            raise UsageError("give a stage either --engine K (one engine) or --engines A,B,... "
                             "(tensor parallel over several), not both.")
        if engines is not None:
            group = tuple(int(e) for e in engines)
            if not group:
                raise UsageError("--engines lists no engine; write them like --engines 0,1.")
            if len(set(group)) != len(group):
                raise UsageError(f"--engines {','.join(map(str, group))} names an engine twice; "
                                 f"each tensor rank needs its own engine.")
            missing = [e for e in group if e not in ids]
            if missing:
                raise UsageError(f"--engines: engine(s) {missing} are not in the pool; "
                                 f"available: {ranges(ids)}.")
        elif engine is None:
            index = list(self.stages).index(name) if name in self.stages else len(self.stages)
            group = (ids[index % len(ids)],)
        elif engine not in ids:
            raise UsageError(f"--engine {engine} is not in the pool; available: {ids}.")
        else:
            group = (engine,)
        others = {n: i.engines for n, i in self.stages.items() if n != name}
        for other, theirs in others.items():
            if set(theirs) & set(group) and tuple(theirs) != group:
                raise UsageError(
                    f"stage `{name}` on engines {list(group)} would share engine(s) "
                    f"{sorted(set(theirs) & set(group))} with stage `{other}` on "
                    f"{list(theirs)}; a stage's engines must be all of another stage's (the "
                    f"same group, for interleaved stages) or none of them.")
        return group

    def _run_cell(self, name: str, cell: Any, blob: bytes,
                  group: Sequence[int]) -> tuple[tuple[str, ...], int]:
        """Run a stage cell on ``group`` (at once, with a comm between them if several); the
        hooks it defines and the bytes of arrays of its first engine."""
        if len(group) == 1:
            replies = {group[0]: self._call(group[0], engine_stages.define, name, cell, blob,
                                            what="its stage cell")}
        else:
            opened = open_comm(self.plane, group, "auto", None)
            try:
                futures = [self.pool.apply(e, engine_stages.define, name, cell, blob,
                                           opened.spec, t) for t, e in enumerate(group)]
                replies = self.pool.answers(futures, group, timeout=STAGE_TIMEOUT,
                                            what="its stage cell", strict=True)
            finally:
                opened.close()
        failures = [replace(r.failure, engine=e) for e, r in replies.items() if not r.ok]
        if failures:
            ok = [e for e, r in replies.items() if r.ok]
            self._call_each(ok, engine_stages.drop, [name], what="the stage to go")
            raise RemoteError(f"the %%stage {name} cell", failures)
        first = replies[group[0]]
        hooks = {r.hooks for r in replies.values()}
        if len(hooks) > 1:
            self._call_each(group, engine_stages.drop, [name], what="the stage to go")
            raise UsageError(f"the tensor ranks of stage `{name}` defined different hooks "
                             f"({sorted(map(list, hooks))}); every rank's cell must define the "
                             f"same functions (branch on tp_rank inside them, not around them).")
        return first.hooks, first.param_bytes

    def placement(self) -> tuple[list[tuple[int, ...]], int, bool]:
        """The engine groups (pipeline ranks) in stage order, the number of virtual stages per
        rank, and whether the stages form a V (rank r holds stages r and 2p-1-r, for zb-v)
        rather than going round-robin (stage s on rank s mod p). A group is one engine, or a
        tensor-parallel stage's engines."""
        if not self.stages:
            raise UsageError("no stages yet: define them with %%stage NAME cells, first to last.")
        groups = [info.engines for info in self.stages.values()]
        live = set(self.pool.alive([e for g in groups for e in g]))
        lost = [(info.name, e) for info in self.stages.values() for e in info.engines
                if e not in live]
        if lost:
            names = ", ".join(f"`{n}` (engine {e})" for n, e in lost)
            raise PoolError(
                f"stage(s) {names} lived on an engine that has stopped, and their parameters "
                f"with it. Define them again on a live engine (`%%stage NAME --engine K`, K one "
                f"of {ranges(self.pool.ids)}), or `%pipeline clear` and start over."
            )
        ranks = list(dict.fromkeys(groups))
        p = len(ranks)
        vee = len(groups) == 2 * p and groups == ranks + ranks[::-1]
        if not vee and (len(groups) % p or any(groups[s] != ranks[s % p]
                                               for s in range(len(groups)))):
            shown = [_shown(g) for g in groups]
            raise UsageError(
                f"stages sit on engines {shown}; with more stages than engines they must go "
                f"round-robin (stage s on engine s mod {p}, for the interleaved schedules) or, "
                f"two per engine, in a V ({[_shown(g) for g in ranks + ranks[::-1]]}, for zb-v). "
                f"Drop --engine from the %%stage lines to get round-robin, or give each stage its "
                f"--engine."
            )
        return ranks, len(groups) // p, vee and p > 1

    def layout(self, replicas: int = 1) -> Layout:
        """Where each stage, replica and tensor rank runs (``%pipeline show`` draws it)."""
        self.placement()  # the stages' engines are alive and in an order a schedule can run
        return self._layout(replicas)

    def _layout(self, replicas: int) -> Layout:
        return Layout.build([i.engines for i in self.stages.values()], self.pool.ids, replicas)

    # -- running -------------------------------------------------------------------------------
    def run(self, x: Any, microbatches: int, dashboard: bool | None = None) -> Any:
        ranks, v, vee = self.placement()
        s = _forward_only(len(ranks), microbatches, v, vee)
        result = self._execute(s, self._layout(1), _split(x, microbatches, "--input"), {}, False,
                               dashboard)
        return _join(result["outputs"], microbatches)

    def train(self, x: Any, target: Any, microbatches: int, schedule: str, steps: int,
              dashboard: bool | None = None, max_stash: float | None = None,
              say: Callable[[str], None] = print, data_parallel: int = 1,
              precision: str = "fp32", checkpoint_every: int | None = None,
              checkpoint_dir: str | None = None) -> list[float]:
        """``steps`` synchronous training steps under ``schedule``; their losses.

        ``data_parallel`` D runs D copies of the whole pipeline on D groups of engines, each on
        its share of every micro-batch (``numpy.array_split``'s rows); their gradients are summed
        before ``step()``, so a step equals one process's over the same micro-batches (write the
        loss normalised by the whole batch, as for micro-batches). ``precision`` bf16 or fp16
        sends activations and gradients between engines in 16 bits (fp16 with dynamic loss
        scaling); the stages' own arithmetic and weights stay as they are. ``checkpoint_every``
        K with ``checkpoint_dir`` saves every stage's arrays there before the first step and
        after every K; when an engine dies mid-run and the pool replaces it, the run goes on
        from the last checkpoint (up to :data:`MAX_RESUMES` times), so it ends as it would have.

        ``schedule="auto"`` runs the first step with a schedule these stages can always run
        (1F1B, or its interleaved / V / zero-bubble form), then the rest with the one whose
        simulation for the op times that step measured is fastest, keeping at most
        ``max_stash`` micro-batches' activations per engine; ``say`` gets which and why.
        """
        ranks, v, vee = self.placement()
        precision = mixed.check_precision(precision)
        folder = checkpoint.check(checkpoint_every, checkpoint_dir)
        layout = self._layout(data_parallel)
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
                f"{len(self.stages)} stages on engines {[_shown(i.engines) for i in self.stages.values()]} "
                + ("form a V, which only --schedule zb-v runs; place them round-robin (no --engine "
                   "on the %%stage lines) for the interleaved schedules." if vee else
                   f"go round-robin; --schedule zb-v needs them in a V: stage s on engine "
                   f"{[_shown(g) for g in ranks + ranks[::-1]]}[s] (`%%stage NAME --engine K`).")
            )
        self._check_hooks(s.name, layout.replicas > 1 or precision == "fp16")
        xs, ts = _split(x, microbatches, "--input"), _split(target, microbatches, "--target")
        short = [j for j, part in enumerate(xs) if len(part) < layout.replicas]
        if short:
            raise UsageError(
                f"micro-batch {short[0]} has {len(xs[short[0]])} row(s), fewer than the "
                f"{layout.replicas} data-parallel replicas that share it; use fewer "
                f"--microbatches or a smaller --data-parallel.")
        # Split alike, rows of different counts would pair each input with the wrong targets.
        if len(np.asarray(x)) != len(np.asarray(target)):
            raise UsageError(
                f"--input has {len(np.asarray(x))} rows but --target has "
                f"{len(np.asarray(target))}; row i of the target goes with row i of the input, "
                f"so they must have the same number of rows."
            )
        if steps < 1:
            raise UsageError(f"--steps must be 1 or more, not {steps}.")
        if layout.replicas > 1 and self._synced != layout:
            self._replicate(layout)
        if precision == "fp16" and self.scaler is None:
            self.scaler = mixed.LossScaler()
        losses: list[float] = []
        self.last = []
        token = secrets.token_hex(4)  # this call's checkpoints, not an earlier call's
        if folder is not None:
            self._checkpoint(folder, 0, token)
        resumed = step = 0
        while step < steps:
            scale = self.scaler.scale if precision == "fp16" else 1.0
            try:
                result = self._execute(s, layout, xs, ts, True, dashboard, precision, scale)
            except RemoteError as exc:
                if (folder is None or resumed >= MAX_RESUMES or self.heal is None
                        or not any(f.ename == "EngineDied" for f in exc.failures)):
                    raise
                resumed += 1
                step = self._resume(folder, token, step, say)
                layout = self.layout(data_parallel)  # the replacement took the dead one's place
                if layout.replicas > 1:
                    self._replicate(layout)
                del losses[step:]
                continue
            # Replica 0 moves on alone without data parallelism: its replicas are stale then.
            self._synced = layout if layout.replicas > 1 else None
            losses.append(result["loss"])
            if precision == "fp16":
                self.scaler.update(self.last[-1].skipped)
            if auto and step == 0:
                s = self._auto(s, len(ranks), microbatches, v, vee, max_stash, steps, say)
            step += 1
            if folder is not None and (step % checkpoint_every == 0 or step == steps):
                self._checkpoint(folder, step, token)
        return losses

    def _checkpoint(self, folder: Any, step: int, token: str) -> None:
        def state(engine: int, name: str) -> Any:
            return self._call(engine, engine_stages.state, name, what=f"stage {name}'s arrays")
        checkpoint.save(folder, step, {n: i.engines for n, i in self.stages.items()}, state,
                        token)

    def _resume(self, folder: Any, token: str, failed: int, say: Callable[[str], None]) -> int:
        """An engine died at step ``failed``: wait for the pool to see it, replace it, and put
        the last checkpoint back into every stage; the step to go on from."""
        deadline = time.monotonic() + RESUME_TIMEOUT
        while not self.heal(say):  # the controller notices a death within a heartbeat or two
            if time.monotonic() > deadline:
                raise PoolError(
                    f"an engine died during step {failed + 1}, but no replacement came within "
                    f"{RESUME_TIMEOUT:g} s (is the pool one nbparallel started, with respawn "
                    f"on?). `%nbp status` shows the engines; `%nbp restart` starts afresh.")
            time.sleep(0.2)
        done, path = checkpoint.latest(folder, token)

        def put(engine: int, name: str, arrays: Any) -> None:
            self._call(engine, engine_stages.load, name, arrays, what=f"stage {name} to take them")
        checkpoint.load(path, {n: i.engines for n, i in self.stages.items()}, put)
        say(f"%pipeline train: an engine died during step {failed + 1}; every stage went back "
            f"to the checkpoint of step {done} in {path}, and training goes on from there.")
        return done

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

    def replaced(self, mapping: dict[int, int]) -> str:
        """Engines ``mapping``'s keys died and its values took their ranks: run again the stage
        cells that lived there, on the new engines (a tensor-parallel stage on its whole
        group), then give them the arrays of a data-parallel replica still in step, if any.
        Returns what it did, in words ("" when no stage was there)."""
        synced, self._synced = self._synced, None
        self._drop_comms()
        live = set(self.pool.ids)
        told = []
        for name, info in list(self.stages.items()):
            if not set(info.engines) & set(mapping):
                continue
            group = tuple(mapping.get(e, e) for e in info.engines)
            cell, blob = self._sources[name]
            self._run_cell(name, cell, blob, group)
            self.stages[name] = replace(info, engine=group[0], engines=group)
            source = None
            for k in range(1, synced.replicas if synced is not None else 0):
                copies = [synced.copies[k][e] for e in info.engines]
                if all(c in live and c not in mapping for c in copies):
                    source = (k, copies)
                    break
            if source is not None:
                k, copies = source
                for new, src in zip(group, copies):
                    arrays = self._call(src, engine_stages.state, name, what=f"stage {name}'s arrays")
                    self._call(new, engine_stages.load, name, arrays, what=f"stage {name} to take them")
                told.append(f"stage `{name}` ran its cell again and took replica {k}'s arrays")
            else:
                lost = ", ".join(str(e) for e in info.engines if e in mapping)
                told.append(f"stage `{name}` ran its cell again: its arrays are what the cell "
                            f"makes, the trained ones were lost with engine {lost}")
        return "; ".join(told)

    def _replicate(self, layout: Layout) -> None:
        """Make replicas 1.. of every stage equal to replica 0: run its cell on their engines,
        then copy replica 0's arrays into them (like DDP's broadcast of the module's state)."""
        for name, info in self.stages.items():
            cell, blob = self._sources[name]
            s = list(self.stages).index(name)
            for k in range(1, layout.replicas):
                group = layout.group(s, k)
                self._run_cell(name, cell, blob, group)
                for e0, ek in zip(info.engines, group):
                    arrays = self._call(e0, engine_stages.state, name, what=f"stage {name}'s arrays")
                    self._call(ek, engine_stages.load, name, arrays,
                               what=f"stage {name}'s replica {k} to take them")
        self._synced = layout

    def _check_hooks(self, schedule: str, gradients: bool = False) -> None:
        infos = list(self.stages.values())
        if gradients:
            missing = [i.name for i in infos if "gradients" not in i.hooks]
            if missing:
                raise UsageError(
                    f"stage(s) {', '.join(f'`{n}`' for n in missing)} define no gradients(): "
                    f"with --data-parallel above 1 (gradients are summed over the replicas) or "
                    f"--precision fp16 (they are unscaled and checked for overflow) every stage "
                    f"must return the arrays its backward accumulates into, e.g. "
                    f"`def gradients(): return [gW, gb]`.")
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

    def _execute(self, s: sched.Schedule, layout: Layout, xs: list[Any], ts: list[Any],
                 train: bool, dashboard: bool | None, precision: str = "fp32",
                 scale: float = 1.0) -> dict[str, Any]:
        plane = self.plane
        names = list(self.stages)
        members = layout.members()
        everyone = [m.engine for m in members]
        # Engines that all share this host's /dev/shm share each other's: hand off through it,
        # and their channels listen on loopback. Across hosts, on the cluster's network.
        one_host = all(plane.is_local(e) for e in everyone)
        run_id = secrets.token_hex(6)
        last = len(names) - 1
        local = self.handoff and one_host
        owner = plane.arena.owner if local else None
        d = layout.replicas
        opened = self._open_comms(layout, members, precision)
        futures = []
        ok = False
        try:
            with self.monitor.watch("%pipeline", everyone, dashboard) as watch:
                watch.queued({eid: 1 for eid in everyone})
                for m in members:
                    groups = {i: layout.group(i, m.replica) for i in range(len(names))}
                    endpoints = {i: [plane.endpoint(e, cluster=not one_host) for e in g]
                                 for i, g in groups.items()}
                    # Stages on GPU engines of this host pass CuPy arrays by CUDA IPC.
                    gpu_stages = frozenset(i for i, g in groups.items()
                                           if local and config.cuda_ipc
                                           and all(self.pool.info(e).get("gpu") for e in g))
                    mine = {i: n for i, n in enumerate(names) if s.rank_of(i) == m.rank}
                    ops = [(op.kind, op.stage, op.mb) for op in s.ranks[m.rank]]
                    inputs = ({j: _share(x, d, m.replica) for j, x in enumerate(xs)}
                              if 0 in mine else {})
                    targets = ({j: _share(t, d, m.replica) for j, t in enumerate(ts)}
                               if last in mine else {})
                    comms = {role: (spec, m.replica if role == "dp" else
                                    m.tp if role == "tp" else everyone.index(m.engine))
                             for role, spec in _roles(opened, m).items()}
                    futures.append(self.pool.apply(
                        m.engine, engine_stages.run_rank, run_id, m.rank, ops, mine, endpoints,
                        len(names), inputs, targets, train, owner, gpu_stages, m.tp == 0, comms,
                        precision, scale))
                    watch.follow(futures[-1], m.engine, run_id,
                                 {i: g[0] for i, g in groups.items()})
                replies = self._collect(futures, members, run_id, watch)
                result = RunResult(s, run_id, layout=layout)
                out: dict[str, Any] = {"outputs": {}, "loss": 0.0}
                for m, fut, reply in zip(members, futures, replies):
                    out["loss"] += sum(reply.losses.values())
                    if m.replica == 0 and m.tp == 0:  # the schedule's own view of the run
                        out["outputs"].update(reply.outputs)
                        result.spans += [(m.rank, *span) for span in reply.spans]
                        result.peak_stash.update(reply.peak_stash)
                    result.bytes_between_stages += sum(reply.sent.values())
                    result.reduce_seconds = max(result.reduce_seconds, reply.reduce_seconds)
                    for backend, source, nbytes in reply.received:  # the comm matrix's cells
                        self.monitor.transfers.append(
                            transfer(source, "comm", "out", backend, nbytes, peer=m.engine))
                        result.comm_bytes += nbytes
                    result.skipped = result.skipped or reply.skipped
                    watch.settle(fut, reply.spans, reply.sent)
                self.monitor.pipeline(run_id, s.name, result.theory, result.peak_stash,
                                      _labels(layout))
            ok = True
        finally:
            if not ok:  # the engines forgot this run's comms (or are gone): so does the notebook
                self._drop_comms()
        self.last.append(result)
        return out

    def _open_comms(self, layout: Layout, members: list[Any], precision: str) -> dict[Any, Any]:
        """The comms of one run: each tensor-parallel group's (``("tp", rank, replica)``), each
        stage engine's replicas (``("dp", rank, tp)``), and for fp16 the whole run's. Kept for
        the next run of the same layout (the engines keep their ends too)."""
        key = (layout, precision == "fp16")
        if self._comms and self._comms_key == key:
            return self._comms
        self._drop_comms()
        opened: dict[Any, Any] = {}
        try:
            for m in members:
                group = layout.rank_group(m.rank, m.replica)
                if len(group) > 1 and ("tp", m.rank, m.replica) not in opened:
                    opened["tp", m.rank, m.replica] = open_comm(self.plane, group, "auto", None)
                if layout.replicas > 1 and ("dp", m.rank, m.tp) not in opened:
                    # A replica may wait at the sum for a slower one's whole step: bounded as
                    # generously as the run (a failed replica releases the others at once).
                    opened["dp", m.rank, m.tp] = open_comm(self.plane, layout.peers(m), "auto",
                                                           STAGE_TIMEOUT)
            if precision == "fp16":
                opened["world"] = open_comm(self.plane, [m.engine for m in members], "auto",
                                            STAGE_TIMEOUT)
        except BaseException:
            for o in opened.values():
                o.close()
            raise
        self._comms, self._comms_key = opened, key
        return opened

    def _drop_comms(self) -> None:
        """Let go of the kept comms: their segments go; an engine closes its end at its next
        run, or when a stage is dropped."""
        comms, self._comms, self._comms_key = self._comms, {}, None
        if not comms:
            return
        ids = [o.spec.id for o in comms.values()]
        engines = {e for o in comms.values() for e in o.spec.engines}
        for e in self.pool.alive(sorted(engines)):
            try:  # not waited for: it runs before anything sent to the engine later
                self.pool.apply(e, engine_stages.forget_comms, ids)
            except PoolError:
                pass  # it stopped just now, and its comms with it
        for o in comms.values():
            o.close()

    def _collect(self, futures: list[Any], members: list[Any], run_id: str,
                 watch: Any) -> list[RankReply]:
        ranks = [m.engine for m in members]
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
        for m, eid, fut in zip(members, ranks, futures):
            # What has arrived (the tick printed the rest while the run went on). Not
            # pool.relay_output: its wait for ipyparallel's idle message made a warm pipeline
            # make a second hand-off segment in 2 of 3 runs of test_pipeline.py (a sleep of the
            # same length did not; cause not found), so a line printed in the last instant of a
            # run may not show at all.
            relay.show(fut, eid, final=True)
            reply, failure = self.pool.outcome(fut, eid, rank=m.rank)
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

    def where(self, replicas: int = 1) -> Any:
        """Where each stage's arrays live, drawn (a ``StageMap``: a grid of stages by
        data-parallel replicas, each cell the engines of the stage's tensor ranks with their
        bytes and device). Replicas not made yet (no data-parallel step since the stages were
        defined) show their engines without bytes."""
        from ..widgets.placement import stage_map

        layout = self.layout(replicas)
        made = self._synced.replicas if self._synced == layout else 1
        rows = []
        for s, (name, info) in enumerate(self.stages.items()):
            engines = [e for k in range(made) for e in layout.group(s, k)]
            sizes = self.pool.call_each(engines, engine_stages.describe, name,
                                        what=f"stage {name}'s arrays")
            for k in range(layout.replicas):
                for t, e in enumerate(layout.group(s, k)):
                    row = {"stage": name, "engine": e, "replica": k, "tp_rank": t,
                           "device": self.pool.info(e).get("device", "?")}
                    if e in sizes:
                        row["bytes"] = sizes[e]["param_bytes"]
                    rows.append(row)
        return stage_map(rows)

    def show(self) -> list[StageInfo]:
        return list(self.stages.values())

    def pull(self, stage: str, var: str, tp_rank: int = 0, replica: int = 0) -> Any:
        """Copy variable ``var`` of stage ``stage`` into the notebook (e.g. trained weights):
        of its tensor rank ``tp_rank`` and data-parallel replica ``replica`` (of the last
        data-parallel run's layout)."""
        if stage not in self.stages:
            raise UsageError(f"no stage named `{stage}`; stages: {', '.join(self.stages) or 'none'}.")
        group = self.stages[stage].engines
        if not 0 <= tp_rank < len(group):
            raise UsageError(f"stage `{stage}` has tensor ranks 0 to {len(group) - 1}, not {tp_rank}.")
        engine = group[tp_rank]
        if replica:
            if self._synced is None or replica >= self._synced.replicas:
                have = self._synced.replicas if self._synced is not None else 1
                raise UsageError(f"replica {replica} of stage `{stage}` does not exist now: the "
                                 f"stages have {have} up-to-date replica(s) (train with "
                                 f"--data-parallel to make more).")
            engine = self._synced.copies[replica][engine]
        return self._call(engine, engine_stages.pull, stage, var, what=f"stage {stage}'s {var}")

    def clear(self) -> None:
        """Forget every stage, here and on the engines (their replicas and tensor ranks too)."""
        if self.stages:
            # A stage on an engine that stopped went with it; a replica may be on any other.
            self._call_each(self.pool.alive(self.pool.ids), engine_stages.drop,
                            list(self.stages), what="the stages to go")
        self.stages.clear()
        self._sources.clear()
        self._synced = None
        self.scaler = None
        self._drop_comms()

    def _call_each(self, engines: Sequence[int], fn: Any, *args: Any, what: str) -> None:
        if engines:
            self.pool.call_each(list(engines), fn, *args, timeout=STAGE_TIMEOUT, what=what)

    def _call(self, engine: int, fn: Any, *args: Any, what: str) -> Any:
        # A stage cell may take long (it builds parameters): bounded, but generously.
        return self.pool.call(engine, fn, *args, timeout=STAGE_TIMEOUT, what=what)


def _shown(group: tuple[int, ...]) -> Any:
    return group[0] if len(group) == 1 else list(group)


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


def _labels(layout: Layout) -> dict[int, str]:
    """Each engine's place in a layout of replicas or tensor ranks, for its dashboard row
    (``d1 t0``: data-parallel replica 1, tensor rank 0); none for a plain pipeline."""
    if layout.replicas == 1 and max(layout.tp_sizes) == 1:
        return {}
    return {m.engine: f"d{m.replica} t{m.tp}" for m in layout.members()}


def _roles(opened: dict[Any, Any], m: Any) -> dict[str, Any]:
    """The comm specs member ``m`` takes part in, by role."""
    roles = {}
    for role, key in (("tp", ("tp", m.rank, m.replica)), ("dp", ("dp", m.rank, m.tp)),
                      ("world", "world")):
        if key in opened:
            roles[role] = opened[key].spec
    return roles


def _share(part: Any, d: int, k: int) -> Any:
    """Replica ``k``'s rows of a micro-batch (numpy.array_split's rule, like micro-batches)."""
    return part if d == 1 else np.array_split(part, d)[k]


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
