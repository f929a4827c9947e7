"""IPython magics: parse the line, call the API, bind results. Nothing else lives here.

``%%scatter``, ``%%pmap``, ``%%stage``, ``%pipeline`` and ``%nbp``; ``%%scatter?`` shows the
generated help.
"""

from __future__ import annotations

import argparse
import re
import shlex
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import pool as pool_mod
from .errors import UsageError
from .pmap import PmapSpec, target_names
from .pmap import run as run_pmap
from .scatter import ScatterSpec
from .scatter import run as run_scatter

__all__ = ["NbparallelMagics"]

_PMAP_LINE = re.compile(r"^\s*(?P<target>.+?)\s+in\s+(?P<expr>.+?)\s*->\s*(?P<rest>.*)$")


def _engine_option(func: Any) -> Any:
    return argument("--engines", metavar="SPEC",
                    help="engines to use, like 0-3,6 (default: all)")(func)


@magics_class
class NbparallelMagics(Magics):
    """The nbparallel magics; registered by ``%load_ext nbparallel``."""

    # -- helpers -------------------------------------------------------------------------------
    def _hidden(self) -> list[str]:
        ns, hidden = self.shell.user_ns, self.shell.user_ns_hidden
        return [k for k, v in hidden.items() if ns.get(k, object()) is v]

    def _lookup(self, names: list[str], role: str) -> dict[str, Any]:
        ns = self.shell.user_ns
        missing = [n for n in names if n not in ns]
        if missing:
            listed = ", ".join(f"`{n}`" for n in missing)
            raise UsageError(
                f"{listed} ({role}) {'is' if len(missing) == 1 else 'are'} not defined in the "
                f"notebook. Define {'it' if len(missing) == 1 else 'them'} in a cell above, or "
                f"check the spelling."
            )
        return {n: ns[n] for n in names}

    # -- %%scatter -----------------------------------------------------------------------------
    @magic_arguments()
    @argument("names", nargs="*", help="names to split across engines (like numpy.array_split)")
    @argument("--broadcast", nargs="+", default=[], metavar="NAME",
              help="names sent whole to every engine")
    @argument("--gather", nargs="+", default=[], metavar="NAME",
              help="names joined in rank order and bound in the notebook")
    @argument("--reduce", nargs="+", default=[], metavar="NAME=OP",
              help="names combined with sum, prod, min, max, concat or list")
    @argument("--axis", type=int, default=0, help="axis to split and join along (default 0)")
    @argument("--halo", type=int, default=0,
              help="rows each shard also gets from each neighbour; the cell sees halo=(lo, hi)")
    @argument("--keep", nargs="+", default=[], metavar="NAME",
              help="names left on the engines; the notebook gets a Resident handle that later "
                   "cells can scatter without moving data (numpy.asarray(handle) gathers)")
    @argument("--transport", default="auto", choices=["auto", "shm", "direct", "ipp"],
              help="how data moves: shared memory, direct channels, or through ipyparallel "
                   "(default: auto, chosen per engine)")
    @argument("--no-dashboard", action="store_true",
              help="no live dashboard under this cell (nbparallel.config.dashboard for all)")
    @_engine_option
    @cell_magic
    def scatter(self, line: str, cell: str) -> None:
        """Run the cell on every engine over shards of the named arrays.

        In the cell: ``rank``, ``size``, ``halo`` and ``xp`` (CuPy on GPU engines, else NumPy)::

            %%scatter a b --broadcast w --gather c --reduce s=sum
            c = a * w + b
            s = float(c.sum())

        ``--keep c`` instead of ``--gather c`` leaves c's shards on the engines and binds a
        :class:`~nbparallel.Resident` handle; scatter the handle in a later cell to reuse them.
        """
        try:
            args = parse_argstring(self.scatter, line)
        except IPythonUsageError as exc:  # ours: one error class for every bad magic line
            raise UsageError(f"%%scatter {line.strip()}: {exc}. `%%scatter?` lists the options.") from None
        spec = ScatterSpec(
            scatter=tuple(args.names), broadcast=tuple(args.broadcast), gather=tuple(args.gather),
            reduce=tuple(_reduce_pairs(args.reduce)), axis=args.axis, halo=args.halo,
            engines=args.engines, keep=tuple(args.keep), transport=args.transport,
            dashboard=False if args.no_dashboard else None,
        )
        spec.check()
        values = self._lookup(list(spec.scatter), "to scatter")
        values.update(self._lookup(list(spec.broadcast), "to broadcast"))
        result = run_scatter(spec, cell, values, self.shell.user_ns, hidden=self._hidden())
        self.shell.user_ns.update(result)

    # -- %%pmap --------------------------------------------------------------------------------
    @cell_magic
    def pmap(self, line: str, cell: str) -> None:
        """Parallel map: the cell is the body of a function of one item.

        ``%%pmap TARGET in ITERABLE -> NAME [--chunksize N] [--unordered] [--retries N]
        [--engines SPEC] [--no-progress] [--no-dashboard] [--transport auto|shm|ipp]``. The
        last expression is each item's result; NAME gets the list of results in input order::

            %%pmap x in range(1000) -> squares
            x * x
        """
        m = _PMAP_LINE.match(line)
        if not m:
            raise UsageError(
                f"cannot read `%%pmap {line.strip()}`; write `%%pmap x in ITERABLE -> NAME`, for "
                f"example `%%pmap x in range(1000) -> squares`."
            )
        rest = _pmap_parser().parse(m["rest"])
        if not rest.out.isidentifier():
            raise UsageError(f"the result name {rest.out!r} after -> is not a valid Python name.")
        spec = PmapSpec(m["target"], rest.chunksize, not rest.unordered, rest.retries,
                        rest.engines, not rest.no_progress, rest.transport,
                        False if rest.no_dashboard else None)
        spec.check()
        target_names(spec.target)
        try:
            items = self.shell.ev(m["expr"])
        except NameError as exc:
            raise UsageError(
                f"{exc.name and f'`{exc.name}`' or m['expr']} (the iterable of %%pmap) is not "
                f"defined in the notebook; define it in a cell above, or check the spelling."
            ) from None
        result = run_pmap(spec, cell, items, self.shell.user_ns, hidden=self._hidden())
        self.shell.user_ns[rest.out] = result

    # -- %%stage and %pipeline -----------------------------------------------------------------
    @cell_magic
    def stage(self, line: str, cell: str) -> None:
        """Define (or replace) a pipeline stage: the cell runs once on its engine.

        ``%%stage NAME [--engine K]``. The cell defines ``forward(x, ctx)`` and, for training,
        ``backward(grad, ctx)`` (or ``backward_input``/``backward_weight`` for zb-h1),
        ``loss(y, target)`` on the last stage and optionally ``step()``. Stages run in the order
        they were first defined; without --engine they go round-robin over the engines::

            %%stage l1
            W = rng.standard_normal((4, 8))
            def forward(x, ctx):
                ctx["x"] = x
                return x @ W
        """
        args = _stage_parser().parse(line)
        pool = pool_mod.ensure()
        info = pool.pipeline.define(args.name, cell, args.engine, self.shell.user_ns,
                                    self._hidden())
        print(f"stage {info.name}: engine {info.engine}, {', '.join(info.hooks)}, "
              f"{info.param_bytes:,} bytes of arrays")

    @line_magic
    def pipeline(self, line: str) -> Any:
        """Run the stages: ``%pipeline run|train|show|schedule|clear``.

        ``%pipeline run --input X --microbatches M --out Y``;
        ``%pipeline train --input X --target T --microbatches M --schedule 1f1b [--steps S]
        --out LOSSES`` (schedules: gpipe, 1f1b, interleaved, zb-h1);
        ``%pipeline schedule --stages P --microbatches M --schedule S [--virtual V]`` shows a
        schedule and its theoretical bubble without running anything.
        """
        from .pipeline import schedule as sched

        args = _pipeline_parser().parse(line)
        if args.command == "schedule":
            s = sched.build(args.schedule, args.stages, args.microbatches, args.virtual)
            print(sched.render(s, sched.simulate(s)))
            return None
        pool = pool_mod.ensure()
        pipe = pool.pipeline
        if args.command == "show":
            print(_stages_table(pipe.show()))
        elif args.command == "clear":
            pipe.clear()
        elif args.command == "run":
            out = _name(args.out)  # before running: a bad name must not cost a run
            x = self._lookup([args.input], "--input")[args.input]
            dashboard = False if args.no_dashboard else None
            self.shell.user_ns[out] = pipe.run(x, args.microbatches, dashboard)
        elif args.command == "train":
            out = _name(args.out)
            found = self._lookup([args.input, args.target], "--input/--target")
            losses = pipe.train(found[args.input], found[args.target], args.microbatches,
                                args.schedule, args.steps, False if args.no_dashboard else None)
            self.shell.user_ns[out] = losses
            last = pipe.last[-1]
            print(f"%pipeline train: {args.steps} step(s), loss {losses[0]:.6g} -> "
                  f"{losses[-1]:.6g}; measured bubble {last.bubble:.0%} (theory "
                  f"{last.theory:.0%})")
        return None

    # -- %nbp ----------------------------------------------------------------------------------
    @line_magic
    def nbp(self, line: str) -> Any:
        """Pool control: ``%nbp start [-n N] [--gpus all|none|0,1]``, ``%nbp connect [--profile P]
        [--cluster-id ID] [--gpus ...]``, ``%nbp status``, ``%nbp restart`` (a started pool, fresh,
        dead engines back), ``%nbp stop``; telemetry:
        ``%nbp monitor`` (a dashboard that follows every magic), ``%nbp trace save FILE.json``
        (spans in Chrome trace format, for Perfetto), ``%nbp dashboard on|off`` (the dashboard
        under long-running magics). ``--gpus``: each engine gets one CUDA device, round-robin
        over those named (default: all it sees; none means CPU only)."""
        args = _nbp_parser().parse(line)
        if args.command == "start":
            pool = pool_mod.start(args.n, gpus=args.gpus)
            print(f"nbparallel: started a local cluster of {len(pool.ids)} engines"
                  f"{_gpu_summary(pool)}.")
        elif args.command == "connect":
            pool = pool_mod.connect(args.profile, args.cluster_id, gpus=args.gpus)
            print(f"nbparallel: connected to {len(pool.ids)} engines{_gpu_summary(pool)}.")
        elif args.command == "status":
            pool = pool_mod.current()
            if pool is None:
                print("nbparallel: no pool yet; `%nbp start` starts one (the first magic does too).")
                return None
            print(_status_table(pool))
        elif args.command == "restart":
            pool = pool_mod.restart()
            print(f"nbparallel: restarted: a fresh local cluster of {len(pool.ids)} engines.")
        elif args.command == "monitor":
            pool_mod.ensure().monitor.open()
        elif args.command == "trace":
            from .telemetry import trace

            mon = pool_mod.ensure().monitor
            spans = mon.spans.since(0)[0]
            try:
                path = trace.save(args.file, spans, mon.transfers.since(0)[0],
                                  mon.samples.since(0)[0])
            except OSError as exc:
                raise UsageError(f"cannot write the trace to {args.file}: {exc.strerror or exc}; "
                                 f"pick a path in a directory you can write to.") from None
            print(f"nbparallel: wrote {len(spans)} spans to {path}; open it in "
                  f"https://ui.perfetto.dev or chrome://tracing.")
        elif args.command == "dashboard":
            from . import config

            config.dashboard = args.state == "on"
            print(f"nbparallel: the dashboard under long-running magics is {args.state}.")
        elif args.command == "stop":
            had = pool_mod.current()
            pool_mod.stop()
            print("nbparallel: stopped." if had and had.how == "started" else
                  "nbparallel: disconnected." if had else "nbparallel: no pool to stop.")
        return None


def _name(text: str) -> str:
    if not text.isidentifier():
        raise UsageError(f"--out {text!r} is not a valid Python name.")
    return text


def _stages_table(stages: list[Any]) -> str:
    if not stages:
        return "no stages yet: define them with %%stage NAME cells, first to last."
    rows = [("stage", "name", "engine", "hooks", "array bytes")]
    rows += [(str(i), s.name, str(s.engine), ", ".join(s.hooks), f"{s.param_bytes:,}")
             for i, s in enumerate(stages)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _reduce_pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, op = item.partition("=")
        if not sep or not name or not op:
            raise UsageError(
                f"cannot read --reduce {item!r}; write NAME=OP, like --reduce s=sum (OP is one of "
                f"sum, prod, min, max, concat, list)."
            )
        pairs.append((name, op))
    return pairs


def _gpu_summary(pool: pool_mod.Pool) -> str:
    """``"; GPUs: engine 0 cuda:0, engine 1 cuda:1"``, or ``""`` when no engine has one."""
    bound = [(e, pool.info(e).get("gpu")) for e in pool.ids]
    bound = [(e, d) for e, d in bound if d]
    if not bound:
        return ""
    return "; GPUs: " + ", ".join(f"engine {e} cuda:{d['index']}" for e, d in bound)


def _status_table(pool: Any) -> str:
    from .gpu import fmt_mem

    engines = pool.status()
    gpus = any(e.gpu_uuid is not None or e.gpu_mem_total is not None or e.device.startswith("cuda")
               for e in engines)
    rows = [("engine", "host", "pid", "device", "state")
            + (("GPU memory used / total",) if gpus else ())]
    for e in engines:
        state = "dead" if not e.alive else "busy" if e.busy else "idle"
        row = (str(e.id), e.host, str(e.pid), e.device, state)
        if gpus:
            row += (f"{fmt_mem(e.gpu_mem)} / {fmt_mem(e.gpu_mem_total)}"
                    if e.device.startswith("cuda") else "-",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{pool!r}\n" + "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that raises a UsageError instead of exiting the kernel."""

    def error(self, message: str) -> None:  # type: ignore[override]
        usage = self.format_usage().strip().removeprefix("usage: ")
        raise UsageError(f"{self.prog}: {message}. Usage: {usage}")

    def parse(self, line: str) -> argparse.Namespace:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"{self.prog}: cannot read {line!r}: {exc}.") from None
        return self.parse_args(words)


def _pmap_parser() -> _Parser:
    p = _Parser(prog="%%pmap", add_help=False)
    p.add_argument("out")
    p.add_argument("--chunksize", type=int, default=None)
    p.add_argument("--unordered", action="store_true")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--engines", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-dashboard", action="store_true")
    p.add_argument("--transport", default="auto", choices=["auto", "shm", "ipp"])
    return p


def _stage_parser() -> _Parser:
    p = _Parser(prog="%%stage", add_help=False)
    p.add_argument("name")
    p.add_argument("--engine", type=int, default=None)
    return p


def _pipeline_parser() -> _Parser:
    p = _Parser(prog="%pipeline", add_help=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", add_help=False)
    run.add_argument("--input", required=True)
    run.add_argument("--microbatches", type=int, default=1)
    run.add_argument("--schedule", default="gpipe", choices=["gpipe"])
    run.add_argument("--out", required=True)
    run.add_argument("--no-dashboard", action="store_true")
    train = sub.add_parser("train", add_help=False)
    train.add_argument("--input", required=True)
    train.add_argument("--target", required=True)
    train.add_argument("--microbatches", type=int, default=1)
    train.add_argument("--schedule", default="1f1b")
    train.add_argument("--steps", type=int, default=1)
    train.add_argument("--out", required=True)
    train.add_argument("--no-dashboard", action="store_true")
    schedule = sub.add_parser("schedule", add_help=False)
    schedule.add_argument("--stages", type=int, required=True)
    schedule.add_argument("--microbatches", type=int, required=True)
    schedule.add_argument("--schedule", default="1f1b")
    schedule.add_argument("--virtual", type=int, default=1)
    sub.add_parser("show", add_help=False)
    sub.add_parser("clear", add_help=False)
    return p


def _nbp_parser() -> _Parser:
    p = _Parser(prog="%nbp", add_help=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    start = sub.add_parser("start", add_help=False)
    start.add_argument("-n", type=int, default=None, help="engines (default: CPU cores)")
    start.add_argument("--gpus", default=None,
                       help="all, none, or CUDA devices like 0,1 (default: all when there are any)")
    connect = sub.add_parser("connect", add_help=False)
    connect.add_argument("--profile", default=None)
    connect.add_argument("--cluster-id", default=None)
    connect.add_argument("--gpus", default=None)
    sub.add_parser("status", add_help=False)
    sub.add_parser("stop", add_help=False)
    sub.add_parser("monitor", add_help=False)
    sub.add_parser("restart", add_help=False)
    trace = sub.add_parser("trace", add_help=False)
    trace.add_argument("action", choices=["save"])
    trace.add_argument("file")
    dashboard = sub.add_parser("dashboard", add_help=False)
    dashboard.add_argument("state", choices=["on", "off"])
    return p
