"""The ``nbparallel`` command: ``nbparallel demo``, ``nbparallel bench`` and ``nbparallel kernel install``.

``nbparallel demo`` runs the quickstart notebook top to bottom on a fresh local cluster and says
whether every check in it passed, which is the quickest way to see that an installation works::

    $ nbparallel demo -n 2
    nbparallel demo: 2 engines, 5 of 5 checks passed, 9.2 s.
    Executed notebook: 01-quickstart.executed.ipynb

``nbparallel bench`` starts a local cluster and times nbparallel's scatter, gather, pmap and a
trivial cell against ipyparallel, Dask, multiprocessing and ``numpy.copyto`` in one run (see
:mod:`nbparallel.bench`); the table goes to stdout, progress to stderr::

    $ nbparallel bench -n 2 --size-mb 64 --json > bench.json

``nbparallel kernel install`` installs the "Python 3 (nbparallel)" kernel spec, which loads the
magics at kernel start. ``python -m nbparallel`` is the same command.

Each subcommand is added to the parser by one ``_add_<name>`` function, so a new one is one more
function and one more line in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from . import format as fmt

__all__ = ["main", "build_parser", "install_kernel_spec", "ensure_kernel_spec", "find_quickstart",
           "run_demo", "DemoResult"]

KERNEL_NAME = "nbparallel"
QUICKSTART = "01-quickstart.ipynb"
DEMO_ENGINES_ENV = "NBPARALLEL_DEMO_ENGINES"
CHECK_TAG = "check"
CELL_TIMEOUT = 600

# Only a fallback: the spec's one source of truth is kernel/kernel.json (shipped as wheel
# shared-data). This copy is used when neither that file nor its installed copy can be found.
FALLBACK_KERNEL_SPEC: dict[str, Any] = {
    "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}",
             f"--ext={KERNEL_NAME}"],
    "display_name": "Python 3 (nbparallel)",
    "language": "python",
    "metadata": {"debugger": True},
}

_Handler = Callable[[argparse.Namespace], int]


# -- entry point -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run ``nbparallel`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on bad usage; callers want a code
        return exc.code if isinstance(exc.code, int) else 2
    handler: _Handler | None = getattr(args, "handler", None)
    if handler is None:
        args.help_parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("nbparallel: interrupted.", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nbparallel`` command, one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="nbparallel",
        description="Parallel computing from Jupyter notebook cells, on ipyparallel engines.",
        epilog="Run `nbparallel COMMAND --help` for the options of one command.",
    )
    parser.set_defaults(help_parser=parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(commands)
    _add_bench(commands)
    _add_kernel(commands)
    return parser


# -- nbparallel kernel install ---------------------------------------------------------------
def _add_kernel(commands: Any) -> None:
    kernel = commands.add_parser("kernel", help="manage the 'Python 3 (nbparallel)' kernel spec",
                                 description="Manage the 'Python 3 (nbparallel)' kernel spec.")
    kernel.set_defaults(help_parser=kernel)
    actions = kernel.add_subparsers(title="actions", metavar="ACTION")
    install = actions.add_parser(
        "install", help="install the kernel spec so Jupyter lists it",
        description="Install the kernel spec that loads nbparallel's magics at kernel start. "
                    "Default: into this virtual environment (--sys-prefix) when run from one, "
                    "else for the current user (--user).")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"install into this Python's prefix ({sys.prefix})")
    where.add_argument("--prefix", metavar="PATH",
                       help="install into PATH/share/jupyter/kernels")
    install.add_argument("--name", default=KERNEL_NAME,
                         help=f"kernel spec name (default: {KERNEL_NAME})")
    install.set_defaults(handler=_cmd_kernel_install)


def _cmd_kernel_install(args: argparse.Namespace) -> int:
    user, prefix = _install_location(args.user, args.sys_prefix, args.prefix)
    try:
        destination = install_kernel_spec(name=args.name, user=user, prefix=prefix)
    except (OSError, ValueError) as exc:
        print(f"nbparallel kernel install: could not install the kernel spec {args.name!r}: "
              f"{exc}. Pick a location you can write to with --user, --sys-prefix or "
              f"--prefix PATH.", file=sys.stderr)
        return 1
    print(f"Installed kernel spec {args.name!r} in {destination}")
    if not _is_searched(Path(destination).parent):
        print(f"Note: Jupyter does not search {Path(destination).parent} by default; add "
              f"{Path(destination).parent.parent} to JUPYTER_PATH to use it.")
    return 0


def _install_location(user: bool, sys_prefix: bool, prefix: str | None) -> tuple[bool, str | None]:
    """(user, prefix) for KernelSpecManager from the flags; the default depends on the Python."""
    if prefix:
        return False, prefix
    if user:
        return True, None
    if sys_prefix or _in_virtualenv():
        return False, sys.prefix
    return True, None


def _in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def install_kernel_spec(name: str = KERNEL_NAME, *, user: bool = False,
                        prefix: str | None = None) -> str:
    """Install the nbparallel kernel spec under ``name``; returns the directory it was written to.

    The spec comes from the package's ``kernel/kernel.json``. Its interpreter is pinned to this
    Python, as ``ipython kernel install`` does, because a Jupyter server from another environment
    would otherwise start a ``python`` that may not have nbparallel installed.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    source = _kernel_spec_source()
    with tempfile.TemporaryDirectory() as tmp:
        # Always stage a copy: installing replaces the destination, which may be the source itself.
        staged = Path(tmp) / name
        if source is not None:
            shutil.copytree(source, staged)
            spec = json.loads((staged / "kernel.json").read_text(encoding="utf-8"))
        else:
            staged.mkdir()
            spec = json.loads(json.dumps(FALLBACK_KERNEL_SPEC))
        if spec["argv"] and spec["argv"][0] in ("python", "python3"):
            spec["argv"][0] = sys.executable
        (staged / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        return KernelSpecManager(log=_quiet_logger()).install_kernel_spec(
            str(staged), kernel_name=name, user=user, prefix=prefix)


def _kernel_spec_source() -> Path | None:
    """The directory holding the package's kernel.json: source checkout first, then installed."""
    checkout = _source_checkout()
    candidates = [checkout / "kernel"] if checkout else []
    candidates.append(Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME)
    for directory in candidates:
        if (directory / "kernel.json").is_file():
            return directory
    return None


def _source_checkout() -> Path | None:
    """The repository root when nbparallel runs from a source checkout (or an editable install)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def _is_searched(kernels_dir: Path) -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    dirs = KernelSpecManager().kernel_dirs
    return any(Path(d).resolve() == kernels_dir.resolve() for d in dirs)


def _quiet_logger() -> logging.Logger:
    # jupyter_client warns through logging when the destination is not searched; we say it in
    # our own words instead (see _cmd_kernel_install), so its record goes nowhere.
    logger = logging.getLogger("nbparallel.cli.kernelspec")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def ensure_kernel_spec(say: Callable[[str], None] = print) -> None:
    """Install the kernel spec into the default location if Jupyter cannot find it."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL_NAME in KernelSpecManager().find_kernel_specs():
        return
    user, prefix = _install_location(False, False, None)
    destination = install_kernel_spec(user=user, prefix=prefix)
    say(f"nbparallel: the {KERNEL_NAME!r} kernel spec was missing; installed it in {destination}.")


# -- nbparallel bench ------------------------------------------------------------------------
def _add_bench(commands: Any) -> None:
    from . import bench as bench_mod

    bench = commands.add_parser(
        "bench", help="time nbparallel against ipyparallel, Dask, multiprocessing and numpy.copyto",
        description="Start a local cluster and run, side by side in one run, scatter/gather of a "
                    "large array, a map over many trivial items and a trivial cell with nbparallel, "
                    "ipyparallel, Dask (when installed: pip install 'nbparallel[bench]'), "
                    "multiprocessing and numpy.copyto; print times, throughput and ratios.")
    bench.add_argument("-n", dest="engines", type=_positive_int, default=2, metavar="N",
                       help="number of engines (and Dask workers, processes) to start (default: 2)")
    bench.add_argument("--size-mb", type=_positive_int, default=256, metavar="MB",
                       help="size of the scattered float64 array in MB (default: 256)")
    bench.add_argument("--items", type=_positive_int, default=2000, metavar="N",
                       help="number of items of the map (default: 2000)")
    bench.add_argument("--repeat", type=_positive_int, default=3, metavar="K",
                       help="timed runs per case after one warm-up; best and median are reported "
                            "(default: 3)")
    bench.add_argument("--only", type=_bench_groups, default=list(bench_mod.DEFAULT_GROUPS),
                       metavar="GROUPS", help=f"comma-separated groups to run, of "
                                              f"{','.join(bench_mod.GROUPS)} (default: all but "
                                              f"gpu)")
    bench.add_argument("--transport", choices=bench_mod.TRANSPORTS, default="auto",
                       help="data plane of nbparallel's scatter (default: auto, chosen per engine)")
    shape = bench.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the report as JSON")
    shape.add_argument("--markdown", action="store_true", help="print a Markdown table")
    bench.add_argument("--output", type=Path, default=None, metavar="FILE.json",
                       help="also write the JSON report to FILE.json")
    bench.set_defaults(handler=_cmd_bench)


def _bench_groups(text: str) -> list[str]:
    from .bench import GROUPS

    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(f"expected groups among {','.join(GROUPS)}, not {text!r}")
    return groups


def _cmd_bench(args: argparse.Namespace) -> int:
    import nbparallel
    from . import bench

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # Whatever the libraries print goes to stderr, so stdout holds only the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        say(f"nbparallel bench: starting {args.engines} engines")
        try:
            pool = nbparallel.start(args.engines)
        except nbparallel.PoolError as exc:
            say(f"nbparallel bench: cannot start: {exc}")
            return 1
        try:
            report = bench.run(pool, size_mb=args.size_mb, items=args.items, repeat=args.repeat,
                               only=args.only, transport=args.transport, progress=say)
        finally:
            nbparallel.stop()
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2) if args.json
          else bench.markdown_table(report) if args.markdown else bench.format_table(report))
    failed = [c for c in report["cases"] if c["name"] == "nbparallel" and c["error"]]
    for case in failed:
        say(f"nbparallel bench: {case['group']} {case['what']} failed: {case['error']}")
    return 1 if failed else 0


# -- nbparallel demo -------------------------------------------------------------------------
def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run the quickstart notebook on a local cluster and report its checks",
        description="Execute the quickstart notebook with the nbparallel kernel on a fresh local "
                    "cluster, save the executed notebook, and report how many checks passed.")
    demo.add_argument("-n", dest="engines", type=_positive_int, default=2, metavar="N",
                      help="number of engines to start (default: 2)")
    demo.add_argument("--output", type=Path, default=None, metavar="PATH",
                      help="where to write the executed notebook (default: "
                           "./NAME.executed.ipynb, for example ./01-quickstart.executed.ipynb)")
    demo.add_argument("--notebook", type=Path, default=None, metavar="PATH",
                      help="run this notebook instead of the quickstart; its code cells tagged "
                           f"'{CHECK_TAG}' are counted as checks")
    demo.set_defaults(handler=_cmd_demo)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


@dataclass(frozen=True)
class DemoResult:
    """What one run of the quickstart notebook did."""

    engines: int  # as requested with -n; the notebook starts that many
    checks_passed: int
    checks_total: int
    seconds: float
    output: Path
    failure: str | None = None  # one paragraph naming the failing cell, or None on success

    @property
    def ok(self) -> bool:
        return self.failure is None and self.checks_passed == self.checks_total


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        notebook = args.notebook or find_quickstart()
        if not notebook.is_file():
            raise FileNotFoundError(f"there is no notebook at {notebook}; check the path given "
                                    f"to --notebook")
        ensure_kernel_spec(say=lambda line: print(line, file=sys.stderr))
    except (OSError, ValueError) as exc:
        print(f"nbparallel demo: cannot start: {exc}.", file=sys.stderr)
        return 1
    output = args.output or Path(f"{notebook.stem}.executed.ipynb")
    progress = _Progress(sys.stderr) if sys.stderr.isatty() else None
    result = run_demo(args.engines, output, on_cell=progress, notebook=notebook)
    if progress:
        progress.clear()
    print(f"nbparallel demo: {result.engines} engines, {result.checks_passed} of "
          f"{result.checks_total} checks passed, {fmt.seconds(result.seconds)}.")
    print(f"Executed notebook: {result.output}")
    if result.failure:
        print(result.failure, file=sys.stderr)
    elif not result.ok:
        print(f"nbparallel demo: {result.checks_total - result.checks_passed} check cell(s) did "
              f"not run; open {result.output} to see which.", file=sys.stderr)
    return 0 if result.ok else 1


def find_quickstart() -> Path:
    """The quickstart notebook: ``notebooks/`` of a source checkout, else the packaged copy."""
    checkout = _source_checkout()
    if checkout and (checkout / "notebooks" / QUICKSTART).is_file():
        return checkout / "notebooks" / QUICKSTART
    packaged = resources.files("nbparallel") / "_data" / QUICKSTART
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"the quickstart notebook {QUICKSTART} is neither in a source checkout's notebooks/ nor "
        f"packaged in nbparallel/_data/; reinstall nbparallel from a wheel or a source checkout")


def run_demo(engines: int, output: Path,
             on_cell: Callable[[int, int, str], None] | None = None,
             notebook: Path | None = None) -> DemoResult:
    """Execute ``notebook`` (default: the quickstart) with ``engines`` engines; count its checks.

    The executed notebook is written to ``output``. The engine count reaches the notebook as the
    environment variable ``NBPARALLEL_DEMO_ENGINES``. ``on_cell(position, total, label)`` is
    called before each code cell runs. A failing cell does not raise: it is described in the
    result's ``failure``, and the notebook is written as far as it ran, so it shows the traceback.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook or find_quickstart(), as_version=4)
    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
    running: list[int] = []  # index of the cell now running; read when execution fails

    def cell_started(cell: Any, cell_index: int, **_: Any) -> None:
        running[:] = [cell_index]
        if on_cell:
            on_cell(code_cells.index(cell_index) + 1, len(code_cells), _label(cell.source))

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, DEMO_ENGINES_ENV: str(engines)}
    t0 = time.perf_counter()
    failure = None
    with tempfile.TemporaryDirectory(prefix="nbp-") as sockets:
        client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL_NAME,
                                resources={"metadata": {"path": str(output.parent.resolve())}},
                                on_cell_execute=cell_started, config=_kernel_config(sockets))
        try:
            client.execute(env=env)
        except Exception as exc:  # every way a run can fail ends in the same report
            failure = _describe_failure(nb, running[0] if running else None, code_cells, exc,
                                        output)
    seconds = time.perf_counter() - t0
    nbformat.write(nb, output)
    passed, total = _count_checks(nb)
    return DemoResult(engines, passed, total, seconds, output, failure)


def _kernel_config(socket_dir: str) -> Any:
    """Kernel manager settings: Unix sockets in ``socket_dir`` where the platform has them."""
    from traitlets.config import Config

    # The demo kernel is local, so it needs no TCP ports: sockets in a private directory are
    # reachable by this user only, and the kernel then has no reason to warn on stderr that its
    # TCP traffic is unencrypted. The path must be absolute because the kernel runs elsewhere.
    if os.name != "posix":
        return Config()
    return Config({"KernelManager": {"transport": "ipc",
                                     "ip": os.path.join(socket_dir, "kernel")}})


def _count_checks(nb: Any) -> tuple[int, int]:
    """(passed, total) over code cells tagged ``check``: passed means it ran without an error."""
    checks = [c for c in nb.cells
              if c.cell_type == "code" and CHECK_TAG in c.get("metadata", {}).get("tags", [])]
    passed = [c for c in checks if c.get("execution_count") is not None
              and not any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    return len(passed), len(checks)


def _describe_failure(nb: Any, index: int | None, code_cells: list[int], exc: Exception,
                      output: Path) -> str:
    """One paragraph: which cell failed, with what, and where to read the whole traceback."""
    # A cell's own error (nbclient's CellExecutionError) carries ename/evalue; anything else is
    # about the kernel or the run itself.
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = exc.evalue if hasattr(exc, "evalue") else _first_line(str(exc), 200)
    if index is None:
        return (f"nbparallel demo failed before the first cell ran ({ename}: {evalue}). The "
                f"{KERNEL_NAME!r} kernel may not start: check that `python -m ipykernel_launcher` "
                f"works in this environment, or reinstall the spec with `nbparallel kernel "
                f"install`.")
    cell = nb.cells[index]
    kind = "check cell" if CHECK_TAG in cell.metadata.get("tags", []) else "code cell"
    # Starting engines is the step most likely to fail for reasons outside the notebook.
    hint = (" If the engines did not start, try fewer with `nbparallel demo -n 1`."
            if "%nbp start" in cell.source else "")
    what = _first_line(evalue, 200).rstrip(".")
    error = f"{ename}: {what}" if what else ename  # a bare `assert` has no message
    return (f"nbparallel demo failed in {kind} {code_cells.index(index) + 1} of "
            f"{len(code_cells)} (`{_label(cell.source)}`): {error}. "
            f"The notebook as far as it ran is in {output}; open it to read the full "
            f"traceback.{hint}")


def _label(source: str) -> str:
    """What a progress line shows for a cell: its first magic (the step it takes), else line one."""
    magic = next((s for s in source.splitlines() if s.lstrip().startswith("%")), None)
    return _first_line(magic or source)


def _first_line(text: str, width: int = 60) -> str:
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    return line if len(line) <= width else line[: width - 3] + "..."


class _Progress:
    """One self-overwriting status line on a terminal ("cell 3/12: %nbp status")."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.width = shutil.get_terminal_size((80, 20)).columns - 1

    def __call__(self, position: int, total: int, label: str) -> None:
        text = f"cell {position}/{total}: {label}"[: self.width]
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r" + " " * self.width + "\r")
        self.stream.flush()
