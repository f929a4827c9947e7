"""IPython magics: parse the line, call the API, bind results. Nothing else lives here.

``%%scatter``, ``%%pmap``, ``%%stage``, ``%pipeline`` and ``%nbp``, each declared with IPython's
``magic_arguments``, so ``%%pmap?`` (and the others) show help generated from the declarations.
Options that several magics take are declared once, as the shared option groups below, and
applied as decorators (the way ipyparallel's ``client/magics.py`` does). Sub-commands
(``%pipeline run``, ``%nbp start``...) are :class:`_command` declarations: each becomes an
argparse sub-parser of the magic's parser, with its own options, usage and help.

Every bad line raises :class:`nbparallel.errors.UsageError` (see :func:`_parse`), never
IPython's UsageError or SystemExit.
"""

from __future__ import annotations

import argparse
import re
import shlex
from typing import Any, Callable

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import (ArgDecorator, MagicArgumentParser, argument, kwds,
                                          magic_arguments)

from . import config
from . import session as session_mod
from .dataplane import transport
from .errors import UsageError
from .format import nbytes
from .pipeline import choose, schedule as sched
from .pipeline.schedule import NAMES as SCHEDULES
from .comm.setup import BACKENDS as COMM_BACKENDS
from .pmap import PmapSpec, target_names
from .pmap import run as run_pmap
from .scatter import ScatterSpec
from .scatter import run as run_scatter
from .telemetry import trace

__all__ = ["NbparallelMagics"]

_PMAP_LINE = re.compile(r"^\s*(?P<target>.+?)\s+in\s+(?P<expr>.+?)\s*->\s*(?P<rest>.*)$")

# -- shared option groups ------------------------------------------------------------------------
# Each is an IPython ``argument``: a decorator on a magic, and usable inside a :class:`_command`.
# (Help strings are %-formatted by argparse: no literal percent signs in them.)

_engines_option = argument(
    "--engines", metavar="SPEC", help="engines to use, like 0-3,6 (default: all)")

_dashboard_option = argument(
    "--no-dashboard", action="store_true",
    help="no live dashboard under this cell (nbparallel.config.dashboard for all)")

_TRANSPORT_WORDS = {transport.SHM: "shared memory", transport.DIRECT: "direct channels",
                    transport.INLINE: "inside ipyparallel's messages"}


def _transport_option(choices: tuple[str, ...]) -> argument:
    """``--transport``, offering ``choices`` (a subset of :data:`transport.OPTIONS`)."""
    forced = [f"{c} ({_TRANSPORT_WORDS.get(c, 'forced')})" for c in choices if c != "auto"]
    return argument(
        "--transport", default="auto", choices=choices,
        help=f"how data moves: {', '.join(forced)}; default: auto, chosen per engine")


_gpus_option = argument(
    "--gpus", default=None, metavar="all|none|0,1",
    help="each engine gets one CUDA device, round-robin over those named (default: all it "
         "sees; none means CPU only)")


def _name_option(flag: str, what: str) -> argument:
    """A required option naming a notebook variable (``--input X``, ``--out Y``)."""
    return argument(flag, required=True, metavar="NAME", help=what)


class _command(ArgDecorator):
    """A sub-command of a magic (``%pipeline run ...``): its name, one line of help, its options.

    Declared like an option, above the ``@argument`` lines of the magic; it adds an argparse
    sub-parser (``args.command`` is its name) and appends the sub-command's help to the magic's.
    """

    def __init__(self, name: str, help: str, *arguments: argument) -> None:
        self.name, self.help, self.arguments = name, help, arguments

    def add_to_parser(self, parser: MagicArgumentParser, group: Any) -> None:
        commands = getattr(parser, "nbp_commands", None)
        if commands is None:  # the first sub-command of this magic
            commands = parser.nbp_commands = parser.add_subparsers(
                dest="command", required=True, parser_class=_CommandParser,
                help="the sub-command (its options are listed below)")
            parser.epilog = "sub-commands:"
        sub = commands.add_parser(self.name, help=self.help, description=self.help)
        for arg in self.arguments:
            arg.add_to_parser(sub, None)
        parser.epilog += "\n\n" + sub.format_help().rstrip()


class _CommandParser(MagicArgumentParser):
    """A sub-command's parser: its errors say which sub-command (``%pipeline run: ...``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _LineError(self, message)


class _LineError(IPythonUsageError):
    """argparse's complaint, with the (sub-)parser that made it."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


def _parse(magic: Callable[..., Any], line: str) -> argparse.Namespace:
    """``line`` parsed by the parser that ``magic_arguments`` built for ``magic``.

    Words are split as a POSIX shell does (``shlex.split``: quotes group and are removed), as
    these magics always did; IPython's ``parse_argstring`` would split with ``arg_split``, which
    keeps the quotes. Whatever is wrong, the error is ours: one paragraph, the usage, the hint.
    A parser's ``prog`` is the magic's name after its first ``%`` (``%pmap`` for the cell
    magic ``%%pmap``, ``pipeline`` for ``%pipeline``): IPython's help puts one ``%`` before it.
    """
    parser = magic.parser
    hint = f"`%{parser.prog}?` lists the options"
    try:
        words = shlex.split(line)
    except ValueError as exc:  # an unterminated quote, a trailing backslash
        raise UsageError(f"%{parser.prog}: cannot read {line!r}: {exc}; close each quote you "
                         f"open (a backslash escapes one character). {hint}.") from None
    try:
        return parser.parse_args(words)
    except IPythonUsageError as exc:
        failed = getattr(exc, "parser", parser)
        usage = " ".join(failed.format_usage().split()).removeprefix(":: ")
        raise UsageError(f"%{failed.prog}: {exc}. Usage: {usage}; {hint}.") from None


def _axis(text: str) -> int | str:
    """--axis: a number, or a dimension name (xarray)."""
    try:
        return int(text)
    except ValueError:
        if text.isidentifier():
            return text
        raise argparse.ArgumentTypeError(
            f"takes a number, or the name of an xarray value's dimension; not {text!r}") from None


WAIT_DEFAULT = 600.0  # seconds %nbp connect --wait waits when given no time


def _seconds(text: str) -> float:
    """--wait: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"takes a number of seconds, 0 or more; not {text!r}")
    return value


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
    @magic_arguments("%scatter")  # the prog: IPython's help writes "%" + prog, so %%scatter
    @argument("names", nargs="*", help="names to split across engines (like numpy.array_split)")
    @argument("--broadcast", nargs="+", default=[], metavar="NAME",
              help="names sent whole to every engine")
    @argument("--gather", nargs="+", default=[], metavar="NAME",
              help="names joined in rank order and bound in the notebook")
    @argument("--reduce", nargs="+", default=[], metavar="NAME=OP",
              help="names combined with sum, prod, min, max, concat or list")
    @argument("--axis", type=_axis, default=0,
              help="axis to split and join along (default 0); for xarray values a dimension name")
    @argument("--by", default=None, metavar="COLUMN",
              help="hash-partition the rows of the scattered DataFrames or Arrow tables by "
                   "COLUMN, so that every key is on exactly one engine (a shuffle)")
    @argument("--halo", type=int, default=0,
              help="rows each shard also gets from each neighbour; the cell sees halo=(lo, hi)")
    @argument("--keep", nargs="+", default=[], metavar="NAME",
              help="names left on the engines; the notebook gets a Resident handle that later "
                   "cells can scatter without moving data (numpy.asarray(handle) gathers)")
    @argument("--comm-timeout", type=float, default=None, metavar="S",
              help="seconds a comm collective waits for the other engines before it fails "
                   "with a report of who is missing (default: nbparallel.config.comm_timeout, 60)")
    @argument("--comm", default="auto", choices=COMM_BACKENDS,
              help="how comm's collectives travel: auto (shared memory between engines of this "
                   "host, else the direct channels), shm or direct")
    @_transport_option(transport.OPTIONS)
    @_dashboard_option
    @_engines_option
    @cell_magic
    def scatter(self, line: str, cell: str) -> None:
        """Run the cell on every engine over shards of the named arrays.

        In the cell: ``rank``, ``size``, ``halo``, ``xp`` (CuPy on GPU engines, else NumPy) and
        ``comm``, collectives between the cell's engines (allreduce, halo, alltoall...)::

            %%scatter a b --broadcast w --gather c --reduce s=sum
            c = a * w + b
            s = float(c.sum())

        ``--keep c`` instead of ``--gather c`` leaves c's shards on the engines and binds a
        :class:`~nbparallel.Resident` handle; scatter the handle in a later cell to reuse them.
        """
        args = _parse(self.scatter, line)
        spec = ScatterSpec(
            scatter=tuple(args.names), broadcast=tuple(args.broadcast), gather=tuple(args.gather),
            reduce=tuple(_reduce_pairs(args.reduce)), axis=args.axis, halo=args.halo,
            engines=args.engines, keep=tuple(args.keep), transport=args.transport,
            dashboard=False if args.no_dashboard else None, comm_timeout=args.comm_timeout,
            comm=args.comm, by=args.by,
        )
        spec.check()
        values = self._lookup(list(spec.scatter), "to scatter")
        values.update(self._lookup(list(spec.broadcast), "to broadcast"))
        result = run_scatter(spec, cell, values, self.shell.user_ns, hidden=self._hidden())
        self.shell.user_ns.update(result)

    # -- %%pmap --------------------------------------------------------------------------------
    @magic_arguments("%pmap")
    @kwds(usage="%(prog)s TARGET in ITERABLE -> NAME [options]")
    @argument("out", metavar="NAME", help="the notebook name bound to the list of results")
    @argument("--chunksize", type=int, default=None, metavar="N",
              help="items per task (default: sized from measured item times)")
    @argument("--unordered", action="store_true",
              help="results in the order they finish, not in input order")
    @argument("--retries", type=int, default=0, metavar="N",
              help="times a failed item is tried again, on any engine (default 0)")
    @_engines_option
    @argument("--no-progress", action="store_true", help="no progress bar")
    @_dashboard_option
    # a load-balanced chunk goes to an engine not known in advance: nothing to pre-send directly
    @_transport_option(tuple(o for o in transport.OPTIONS if o != transport.DIRECT))
    @cell_magic
    def pmap(self, line: str, cell: str) -> None:
        """Parallel map: the cell is the body of a function of one item.

        ``%%pmap TARGET in ITERABLE -> NAME [options]``: TARGET is written as in a for loop
        (``x``, ``i, row``); the cell's last expression is each item's result; NAME gets the
        list of results in input order::

            %%pmap x in range(1000) -> squares
            x * x
        """
        m = _PMAP_LINE.match(line)
        if not m:
            raise UsageError(
                f"cannot read `%%pmap {line.strip()}`; write `%%pmap x in ITERABLE -> NAME`, for "
                f"example `%%pmap x in range(1000) -> squares`."
            )
        args = _parse(self.pmap, m["rest"])
        if not args.out.isidentifier():
            raise UsageError(f"the result name {args.out!r} after -> is not a valid Python name.")
        spec = PmapSpec(target=m["target"], chunksize=args.chunksize, ordered=not args.unordered,
                        retries=args.retries, engines=args.engines,
                        progress=not args.no_progress, transport=args.transport,
                        dashboard=False if args.no_dashboard else None)
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
        self.shell.user_ns[args.out] = result

    # -- %%stage and %pipeline -----------------------------------------------------------------
    @magic_arguments("%stage")
    @argument("name", help="the stage's name (a Python name); a new name adds a stage at the end")
    @argument("--engine", type=int, default=None, metavar="K",
              help="the engine that holds the stage (default: round-robin over the engines)")
    @argument("--engines", default=None, metavar="A,B",
              help="tensor parallel: the cell runs on each of these engines, with `comm` "
                   "spanning them, `tp_rank` and `tp_size`")
    @cell_magic
    def stage(self, line: str, cell: str) -> None:
        """Define (or replace) a pipeline stage: the cell runs once on its engine.

        The cell defines ``forward(x, ctx)`` and, for training, ``backward(grad, ctx)`` (or
        ``backward_input``/``backward_weight`` for zb-h1), ``loss(y, target)`` on the last stage
        and optionally ``step()``. Stages run in the order they were first defined::

            %%stage l1
            W = rng.standard_normal((4, 8))
            def forward(x, ctx):
                ctx["x"] = x
                return x @ W
        """
        args = _parse(self.stage, line)
        engines = _engine_list(args.engines) if args.engines is not None else None
        pool = session_mod.ensure()
        info = pool.pipeline.define(args.name, cell, args.engine, self.shell.user_ns,
                                    self._hidden(), engines=engines)
        where = (f"engine {info.engine}" if len(info.engines) == 1 else
                 f"engines {', '.join(map(str, info.engines))} (tensor parallel)")
        print(f"stage {info.name}: {where}, {', '.join(info.hooks)}, "
              f"{info.param_bytes:,} bytes of arrays" + (" on each" if len(info.engines) > 1 else ""))

    @magic_arguments()
    @_command("run", "run the stages forward over micro-batches of --input",
              _name_option("--input", "the notebook array fed to the first stage"),
              argument("--microbatches", type=int, default=1, metavar="M",
                       help="micro-batches the input is split into (default 1)"),
              argument("--schedule", default="gpipe", choices=["gpipe"],
                       help="a forward-only run has one order: gpipe"),
              _name_option("--out", "the notebook name bound to the last stage's output"),
              _dashboard_option)
    @_command("train", "train the stages: forward, loss, backward and step() per micro-batch",
              _name_option("--input", "the notebook array fed to the first stage"),
              _name_option("--target", "the notebook array the last stage's loss compares with"),
              argument("--microbatches", type=int, default=1, metavar="M",
                       help="micro-batches per step (default 1)"),
              argument("--schedule", default="1f1b", metavar="S",
                       help=f"{', '.join(SCHEDULES)}, or auto: after a first step, the one that "
                       f"simulates fastest for the measured op times (default 1f1b)"),
              argument("--max-stash", type=float, default=None, metavar="N",
                       help="with --schedule auto: at most N micro-batches' activations per engine"),
              argument("--steps", type=int, default=1, metavar="N",
                       help="training steps, each over all micro-batches (default 1)"),
              argument("--data-parallel", type=int, default=1, metavar="D",
                       help="copies of the pipeline on D groups of engines, each on its share "
                            "of every micro-batch, gradients summed before step() (default 1)"),
              argument("--precision", default="fp32", metavar="P",
                       help="what activations and gradients travel in: fp32, bf16 or fp16 "
                            "(with dynamic loss scaling) (default fp32)"),
              argument("--checkpoint-every", nargs=2, default=None, metavar=("K", "DIR"),
                       help="save every stage's arrays in DIR every K steps; a run whose engine "
                            "died goes on from the last one once the engine is replaced"),
              _name_option("--out", "the notebook name bound to the list of losses, one a step"),
              _dashboard_option)
    @_command("schedule", "show a schedule and its theoretical bubble; runs nothing",
              argument("--stages", type=int, required=True, metavar="P", help="pipeline stages"),
              argument("--microbatches", type=int, required=True, metavar="M",
                       help="micro-batches"),
              argument("--schedule", default="1f1b", metavar="S",
                       help=f"{', '.join(SCHEDULES)} (default 1f1b)"),
              argument("--virtual", type=int, default=1, metavar="V",
                       help="virtual stages per engine, for interleaved and interleaved-zb "
                       "(default 1; zb-v always has 2)"),
              argument("--costs", default=None, metavar="'f=1 b=2 i=1 w=1 comm=0'",
                       help="op times of one engine's share of the model (default those)"),
              argument("--compare", action="store_true",
                       help="simulate every schedule for these costs, side by side"))
    @_command("show", "list the stages (name, engines, hooks, array bytes) and their layout",
              argument("--data-parallel", type=int, default=1, metavar="D",
                       help="draw the layout with D replicas (default 1)"))
    @_command("clear", "forget every stage")
    @line_magic
    def pipeline(self, line: str) -> Any:
        """Run the stages defined by ``%%stage`` cells, first to last, over micro-batches.

        ``schedule`` runs nothing: it draws a schedule and its theoretical bubble. For example::

            %pipeline train --input X --target T --microbatches 8 --steps 20 --out losses
        """
        args = _parse(self.pipeline, line)
        if args.command == "schedule":
            costs = choose.parse_costs(args.costs) if args.costs else sched.Costs()
            if args.compare:
                v = args.virtual if args.virtual > 1 else 2
                print(f"{args.stages} engines, {args.microbatches} micro-batches, interleaved "
                      f"with v={v}; op times f={costs.f:g} b={costs.b:g} i={costs.i:g} "
                      f"w={costs.w:g}, comm={costs.comm:g}:")
                print(choose.table(choose.compare(args.stages, args.microbatches, costs, v=v)))
                return None
            s = sched.build(args.schedule, args.stages, args.microbatches, args.virtual)
            print(sched.render(s, sched.simulate(s, costs)))
            return None
        pool = session_mod.ensure()
        pipe = pool.pipeline
        if args.command == "show":
            print(_stages_table(pipe.show()))
            if pipe.stages:
                from IPython.display import display

                print()
                display(pipe.where(args.data_parallel))  # a drawing in a notebook, text here
        elif args.command == "clear":
            pipe.clear()
        elif args.command == "run":
            out = _name(args.out)  # before running: a bad name must not cost a run
            x = self._lookup([args.input], "--input")[args.input]
            dashboard = False if args.no_dashboard else None
            self.shell.user_ns[out] = pipe.run(x, args.microbatches, dashboard)
        elif args.command == "train":
            out = _name(args.out)
            every, folder = _checkpoint_option(args.checkpoint_every)
            found = self._lookup([args.input, args.target], "--input/--target")
            losses = pipe.train(found[args.input], found[args.target], args.microbatches,
                                args.schedule, args.steps, False if args.no_dashboard else None,
                                max_stash=args.max_stash, data_parallel=args.data_parallel,
                                precision=args.precision, checkpoint_every=every,
                                checkpoint_dir=folder)
            self.shell.user_ns[out] = losses
            last = pipe.last[-1]
            extra = ""
            if args.data_parallel > 1:
                extra += (f"; {args.data_parallel} replicas, gradient sum "
                          f"{last.reduce_seconds * 1e3:.3g} ms a step")
            skipped = sum(r.skipped for r in pipe.last)
            if args.precision == "fp16":
                extra += (f"; fp16 loss scale {pipe.scaler.scale:g}, {skipped} step(s) skipped "
                          f"for overflow")
            print(f"%pipeline train: {args.steps} step(s), loss {losses[0]:.6g} -> "
                  f"{losses[-1]:.6g}; measured bubble {last.bubble:.0%} (theory "
                  f"{last.theory:.0%} for the measured op times, {last.theory_equal:.0%} for "
                  f"equal stages){extra}")
        return None

    # -- %nbp ----------------------------------------------------------------------------------
    @magic_arguments()
    @_command("start", "start a local cluster (and make it the pool)",
              argument("-n", type=int, default=None, metavar="N",
                       help="engines (default: one per CPU core)"),
              argument("--no-respawn", action="store_true",
                       help="leave dead engines dead (by default each is replaced, in its "
                            "rank, before the next magic)"),
              _gpus_option)
    @_command("connect", "connect to a cluster started with ipcluster",
              argument("--profile", default=None, metavar="P",
                       help="its IPython profile: a name, or the folder given to ipcluster's "
                            "--profile-dir"),
              argument("--cluster-id", default=None, metavar="ID", help="its cluster id"),
              argument("--wait", nargs="?", const=WAIT_DEFAULT, default=None, type=_seconds,
                       metavar="SECONDS", help=f"wait for the engines to come (a queued batch "
                       f"job), at most SECONDS (default {WAIT_DEFAULT:g})"),
              argument("-n", type=int, default=None, metavar="N",
                       help="engines to have (with --wait: default, as many as ipcluster "
                       "launched; without: 1)"),
              _gpus_option)
    @_command("status", "the engines: host, pid, device, state (and GPU memory)")
    @_command("stop", "stop a started cluster, or disconnect from a connected one")
    @_command("monitor", "a dashboard that follows every magic",
              argument("--side", action="store_true",
                       help="in a JupyterLab side panel beside the notebook (needs sidecar)"))
    @_command("restart", "a started pool, fresh: a new cluster, dead engines back")
    @_command("trace", "save the spans in Chrome trace format (open in Perfetto)",
              argument("action", choices=["save"], help="the one action: save"),
              argument("file", help="the .json file to write"))
    @_command("dashboard", "the dashboard under long-running magics, on or off",
              argument("state", choices=["on", "off"], help="on or off"))
    @line_magic
    def nbp(self, line: str) -> Any:
        """Pool control (start, connect, status, restart, stop) and telemetry (monitor, trace,
        dashboard)::

            %nbp start -n 4 --gpus none
        """
        args = _parse(self.nbp, line)
        if args.command == "start":
            pool = session_mod.start(args.n, gpus=args.gpus, respawn=not args.no_respawn)
            print(f"nbparallel: started a local cluster of {len(pool.ids)} engines"
                  f"{_gpu_summary(pool)}.")
        elif args.command == "connect":
            pool = session_mod.connect(args.profile, args.cluster_id, gpus=args.gpus,
                                       wait=args.wait, n=args.n)
            print(f"nbparallel: connected to {session_mod.connected(pool)}{_gpu_summary(pool)}.")
        elif args.command == "status":
            pool = session_mod.current()
            if pool is None:
                print("nbparallel: no pool yet; `%nbp start` starts one (the first magic does too).")
                return None
            print(_status_table(pool, pool.plane.channel_stats()))
        elif args.command == "restart":
            pool = session_mod.restart()
            print(f"nbparallel: restarted: a fresh local cluster of {len(pool.ids)} engines.")
        elif args.command == "monitor":
            session_mod.ensure().monitor.open(side=args.side)
        elif args.command == "trace":
            mon = session_mod.ensure().monitor
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
            config.dashboard = args.state == "on"
            print(f"nbparallel: the dashboard under long-running magics is {args.state}.")
        elif args.command == "stop":
            had = session_mod.current()
            session_mod.stop()
            print("nbparallel: stopped." if had and had.how == "started" else
                  "nbparallel: disconnected." if had else "nbparallel: no pool to stop.")
        return None


def _name(text: str) -> str:
    if not text.isidentifier():
        raise UsageError(f"--out {text!r} is not a valid Python name.")
    return text


def _checkpoint_option(value: list[str] | None) -> tuple[int | None, str | None]:
    if value is None:
        return None, None
    try:
        return int(value[0]), value[1]
    except ValueError:
        raise UsageError(f"--checkpoint-every {value[0]!r} {value[1]!r}: K is a whole number of "
                         f"steps, then the folder, e.g. --checkpoint-every 5 ckpt/.") from None


def _engine_list(text: str) -> list[int]:
    try:
        return [int(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise UsageError(f"--engines {text!r}: list engine ids with commas, like --engines 0,1.") from None


def _stages_table(stages: list[Any]) -> str:
    if not stages:
        return "no stages yet: define them with %%stage NAME cells, first to last."
    rows = [("stage", "name", "engine", "hooks", "array bytes")]
    rows += [(str(i), s.name, ", ".join(map(str, s.engines)), ", ".join(s.hooks),
              f"{s.param_bytes:,}") for i, s in enumerate(stages)]
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


def _gpu_summary(pool: session_mod.Session) -> str:
    """``"; GPUs: engine 0 cuda:0, engine 1 cuda:1"``, or ``""`` when no engine has one."""
    bound = [(e, pool.info(e).get("gpu")) for e in pool.ids]
    bound = [(e, d) for e, d in bound if d]
    if not bound:
        return ""
    return "; GPUs: " + ", ".join(f"engine {e} cuda:{d['index']}" for e, d in bound)


def _status_table(pool: Any, channels: dict[int, dict[str, int]] | None = None) -> str:
    """The ``%nbp status`` table; ``channels`` (engine -> its direct channel's counts) adds how
    many messages each engine's channel refused (unsigned, tampered, replayed, malformed)."""
    engines = pool.status()
    gpus = any(e.gpu_uuid is not None or e.gpu_mem_total is not None or e.device.startswith("cuda")
               for e in engines)
    mpi = any(e.mpi_rank is not None for e in engines)
    rows = [("engine", "host", "pid", "device", "state")
            + (("GPU memory used / total",) if gpus else ()) + (("MPI rank",) if mpi else ())
            + (("refused",) if channels is not None else ())]
    for e in engines:
        state = ("dead" + (f", replaced by {e.replaced_by}" if e.replaced_by is not None else "")
                 if not e.alive else "busy" if e.busy else "idle")
        row = (str(e.id), e.host, str(e.pid), e.device, state)
        if gpus:
            row += (f"{nbytes(e.gpu_mem)} / {nbytes(e.gpu_mem_total)}"
                    if e.device.startswith("cuda") else "-",)
        if mpi:
            row += ("-" if e.mpi_rank is None else str(e.mpi_rank),)
        if channels is not None:
            row += (str(channels[e.id]["refused"]) if e.id in channels else "?",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{pool!r}\n" + "\n".join(lines)
