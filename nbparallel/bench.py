"""Side by side on one pool: nbparallel against ipyparallel, Dask, multiprocessing and ``numpy.copyto``.

Every case runs in the same process on the same engines, so the ratios compare like with like on
this machine; nothing printed is a constant. The groups:

* ``scatter``: a float64 array of ``size_mb`` MB split over the engines and joined again, timed per
  direction and as a round trip; ``numpy.copyto`` into a written buffer is the memory ceiling.
* ``pmap``: ``items`` trivial items (``x + 1``), load-balanced over the engines; also with
  ``nbparallel.config.telemetry`` off, which prices the spans and samples the dashboard reads.
* ``roundtrip``: the latency of a trivial cell, ``nbparallel.scatter("y = x", ...)`` of a few
  items, against ``%px pass``.
* ``comm``: collectives between two engines (allreduce of 8 B, 1 MB, 64 MB; a 32 KiB halo
  exchange) beside mpi4py under ``mpiexec -n 2``; see ``benchcomm.py``.
* ``tables``: pandas DataFrames scattered and gathered, and hash-partitioned with ``by=``,
  beside ``DataFrame.copy()`` and Dask's ``from_pandas``/``shuffle``; see ``benchtables.py``.
* ``train``: a data-parallel step of 50 ms compute with and without its 16 MB gradient sum,
  and a 2-stage step with 16 MB of activations in fp32, bf16 and fp16; see ``benchtrain.py``.
* ``gpu`` (only with ``--only gpu``): CUDA IPC between GPU engines and a RawKernel stencil over a
  device-resident shard, each against the device's own copy speed; see ``benchgpu.py``.
* ``pipeline``: two stages on the first two engines. ``activation hop``: the time of a
  forward-only run whose first stage hands ``size_mb`` MB of activations, in 8 micro-batches, to
  the second, minus the same run with 8-byte activations; through shared memory and through the
  signed sockets, against ``numpy.copyto`` of the same bytes. ``per micro-batch``: (time of 64
  micro-batches - time of 1) / 63 for 8x8 arrays.

Each case has one untimed warm-up run, which also checks the result, then ``repeat`` timed runs;
the best and the median are reported (``benchkit.py`` holds that loop, which every group shares).
A case that raises is reported in its own row and the others still run. In a notebook::

    import nbparallel
    from nbparallel import bench
    print(bench.format_table(bench.run(nbparallel.current(), size_mb=64)))
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import importlib.util
import logging
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

import nbparallel

from . import benchcomm, benchgpu, benchtables, benchtrain, config
from .benchkit import HOP, HOP_MBS, MB, NB, Setup, Trial
from .benchkit import check as _check
from .benchkit import measure as _measure
from .benchkit import one as _one
from .benchkit import ready as _ready
from .benchkit import split as _split
from .dataplane import transport
from .dataplane.transport import SHM
from .format import seconds
from .pipeline.runtime import Pipeline

if TYPE_CHECKING:
    from .session import Session

__all__ = ["GROUPS", "DEFAULT_GROUPS", "TRANSPORTS", "Trial", "Setup", "run", "format_table",
           "markdown_table", "machine"]

GROUPS = ("scatter", "pmap", "roundtrip", "pipeline", "comm", "tables", "train", "gpu")
#: What runs without --only: the GPU group only where asked for (its rows need GPU engines).
DEFAULT_GROUPS = GROUPS[:7]
#: Rows that are the memory ceiling of their group: ratios against them are percentages.
CEILINGS = ("numpy.copyto", "cupy device-to-device copy", benchtables.COPY)
TRANSPORTS = transport.OPTIONS  #: what --transport takes (the data plane defines them)
ROUNDTRIP_CALLS = 50  # latency is noisy: a median needs more samples than a bandwidth best
MP_TIMEOUT = 120  # seconds; only ends a multiprocessing case whose workers cannot start
NO_TELEMETRY = "nbparallel, telemetry off"
SHARED = "nbparallel, shared array"  #: scattering an array already in shared memory: no copy
TELEMETRY_RUNS = 15
DIRECTIONS = ("scatter", "gather", "round trip")
ONE_CELL = "scatter+gather (one cell)"
ROUNDTRIP = "trivial cell"
IPP_NAME = "_nbp_bench_x"  # not `x`: the pool may be the user's, whose engines may hold an `x`


def _inc(x: int) -> int:
    """The trivial item function, module-level so that engines, workers and spawned processes
    import it by name instead of receiving code."""
    return x + 1


WORK_ITEMS, WORK_SECONDS = 1000, 0.002  # the efficiency case: 1000 items of 2 ms of CPU each
WORK = "1000 items of 2 ms"
SPIN = ("import time\nt0 = time.perf_counter()\nwhile time.perf_counter() - t0 < 0.002:\n"
        "    pass\nx + 1")


def _spin(x: int) -> int:
    """2 ms of CPU (a busy wait, not a sleep: the engines must compete for the cores)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < WORK_SECONDS:
        pass
    return x + 1


# -- running -----------------------------------------------------------------------------------
def run(pool: Session | None, *, size_mb: int = 256, items: int = 2000, repeat: int = 3,
        only: Sequence[str] = DEFAULT_GROUPS, transport: str = "auto",
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the groups in ``only`` on ``pool``; return the report (plain data, JSON-ready).

    ``transport`` is passed to :func:`nbparallel.scatter` unless it is ``"auto"``. ``progress``
    receives one line per case as it starts.
    """
    if pool is None:
        raise nbparallel.UsageError("no pool to benchmark: start one with nbparallel.start(n).")
    if set(only) - set(GROUPS) or transport not in TRANSPORTS or min(size_mb, items, repeat) < 1:
        raise nbparallel.UsageError(
            f"bad bench options: groups {list(only)} (known: {', '.join(GROUPS)}), transport "
            f"{transport!r} (known: {', '.join(TRANSPORTS)}); size_mb, items, repeat must be >= 1.")
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    n, say = len(pool.ids), progress or (lambda _line: None)
    cases: list[dict[str, Any]] = []
    if "scatter" in only:
        cases += _scatter_group(pool, n, size_mb, repeat, transport, say)
    if "pmap" in only:
        cases += _pmap_group(pool, n, items, repeat, say)
    if "roundtrip" in only:
        cases += _roundtrip_group(pool, n, say)
    if "pipeline" in only:
        cases += _pipeline_group(pool, size_mb, repeat, say)
    if "comm" in only:
        cases += benchcomm.group(pool, repeat, say)
    if "tables" in only:
        cases += benchtables.group(pool, size_mb, repeat, say,
                                   _dask_client if _dask_importable() else None)
    if "train" in only:
        cases += benchtrain.group(pool, repeat, say)
    if "gpu" in only:
        cases += benchgpu.group(pool, size_mb, repeat, say)
    return {"machine": machine(), "date": date, "engines": n, "size_mb": size_mb, "items": items,
            "repeat": repeat, "transport": transport, "groups": [g for g in GROUPS if g in only],
            "cases": cases, "ratios": _ratios(cases)}


# -- the groups --------------------------------------------------------------------------------
def _scatter_group(pool: Session, n: int, size_mb: int, repeat: int, transport: str,
                   say: Callable[[str], None]) -> list[dict[str, Any]]:
    a = np.random.default_rng(0).random(size_mb * MB // 8)
    moved = {"scatter": a.nbytes, "gather": a.nbytes, "round trip": 2 * a.nbytes,
             ONE_CELL: 2 * a.nbytes}
    kw: dict[str, Any] = {} if transport == "auto" else {"transport": transport}
    dv = pool.pool.client[pool.ids]

    def keep() -> Any:
        return nbparallel.scatter("", {"x": a}, keep=["x"], pool=pool, **kw)["x"]

    def one_cell() -> Any:
        return nbparallel.scatter("y = x", {"x": a}, gather=["y"], pool=pool, **kw)["y"]

    @contextmanager
    def shared() -> Iterator[Trial]:
        # An array already in the pool's shared memory (nbparallel.asshared, or a gathered
        # result): its pieces are handed to the engines where they lie, with no copy.
        s = nbparallel.asshared(a, pool=pool)

        def keep_shared() -> Any:
            cursor = pool.transfers.cursor
            handle = nbparallel.scatter("", {"x": s}, keep=["x"], pool=pool, **kw)["x"]
            copied = sum(r.nbytes for r in pool.transfers.since(cursor)[0] if r.kind == "scatter")
            if transport in ("auto", SHM) and copied:
                raise RuntimeError(f"a shared array's scatter copied {copied} bytes")
            return handle

        yield _split(keep_shared, np.asarray, lambda h: h.free(), a)

    @contextmanager
    def ipp() -> Iterator[Trial]:
        try:
            yield _split(lambda: dv.scatter(IPP_NAME, a, block=True),
                         lambda _: dv.gather(IPP_NAME, block=True), lambda _: None, a)
        finally:  # leave the engines' namespaces as they were
            dv.execute(f"globals().pop({IPP_NAME!r}, None)", block=True)

    @contextmanager
    def copyto() -> Iterator[Trial]:
        # Both buffers written once already, so the copies measure bandwidth, not page faults.
        dst, back = np.full_like(a, -1.0), np.full_like(a, -1.0)

        def copy_back(_: Any) -> np.ndarray:
            np.copyto(back, dst)
            return back

        yield _split(lambda: np.copyto(dst, a), copy_back, lambda _: None, a)

    def case(name: str, whats: Sequence[str], setup: Setup | None) -> list[dict[str, Any]]:
        return _measure("scatter", name, whats, setup, repeat, say, nbytes=moved)

    return (case(NB, DIRECTIONS, _ready(_split(keep, np.asarray, lambda h: h.free(), a)))
            + case(NB, [ONE_CELL], _ready(_one(ONE_CELL, one_cell, a)))
            + case(SHARED, ["scatter"], shared)
            + case("ipyparallel", DIRECTIONS, ipp)
            + case("dask", DIRECTIONS, (lambda: _dask_scatter(n, a)) if _dask_importable() else None)
            + case("numpy.copyto", DIRECTIONS, copyto))


@contextmanager
def _dask_scatter(n: int, a: np.ndarray) -> Iterator[Trial]:
    shards = np.array_split(a, n)
    with _dask_client(n) as client:
        workers = sorted(client.nthreads())

        def scatter() -> list[Any]:
            # hash=False: tokenizing the shards would time Dask's hashing, not its transfer. A list
            # as long as the worker list is placed round-robin: one shard per worker.
            return client.scatter(shards, workers=workers, direct=True, hash=False)

        def gather(futures: list[Any]) -> np.ndarray:
            return np.concatenate(client.gather(futures, direct=True))

        def placed(futures: list[Any]) -> None:
            holders = client.who_has(futures)
            if sorted(w for f in futures for w in holders[f.key]) != workers:
                raise RuntimeError(f"Dask did not place one shard per worker: {holders}")

        yield _split(scatter, gather, client.cancel, a, placed)


@contextmanager
def _dask_client(n: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.wait_for_workers(n)
        yield client


def _pmap_group(pool: Session, n: int, items: int, repeat: int,
                say: Callable[[str], None]) -> list[dict[str, Any]]:
    want = list(range(1, items + 1))
    lview = pool.pool.client.load_balanced_view(pool.ids)

    @contextmanager
    def dask() -> Iterator[Trial]:
        with _dask_client(n) as client:
            yield _one("map", lambda: client.gather(client.map(_inc, range(items), pure=False)), want)

    @contextmanager
    def processes(fn: Callable[[int], int] = _inc, count: int = items,
                  what: str = "map") -> Iterator[Trial]:
        # spawn, not fork: this process runs ipyparallel's and Dask's threads, and a forked copy
        # of a threaded process can deadlock. The timeout ends the case if workers cannot start
        # (a main module that spawn cannot re-import makes Pool replace them forever).
        with multiprocessing.get_context("spawn").Pool(n) as mp:
            yield _one(what, lambda: mp.map_async(fn, range(count)).get(MP_TIMEOUT),
                       list(range(1, count + 1)))

    @contextmanager
    def loky(fn: Callable[[int], int] = _inc, count: int = items, what: str = "map") -> Iterator[Trial]:
        import joblib

        # joblib's default backend: loky's reusable worker processes, kept between runs.
        run = joblib.Parallel(n_jobs=n, backend="loky")
        yield _one(what, lambda: run(joblib.delayed(fn)(i) for i in range(count)),
                   list(range(1, count + 1)))

    @contextmanager
    def ideal() -> Iterator[Trial]:
        # Perfect parallelism: the work divided by the engines, with nothing for dispatch.
        yield lambda _check_it: {WORK: WORK_ITEMS * WORK_SECONDS / n}

    def case(name: str, setup: Setup | None, times: int = repeat) -> list[dict[str, Any]]:
        return _measure("pmap", name, ["map"], setup, times, say, items=items)

    def work(name: str, setup: Setup | None) -> list[dict[str, Any]]:
        return _measure("pmap", name, [WORK], setup, repeat, say, items=WORK_ITEMS)

    def busy() -> list[int]:
        return nbparallel.pmap(SPIN, "x", range(WORK_ITEMS), pool=pool, show_progress=False)

    def ipp(size: int) -> Setup:
        return _ready(_one("map", lambda: lview.map_sync(_inc, range(items), chunksize=size), want))

    def mine() -> list[int]:
        return nbparallel.pmap("x + 1", "x", range(items), pool=pool, show_progress=False)

    listed = list(range(items))

    def mine_listed() -> list[int]:
        # A range travels as slices; a list's items are pickled one by one.
        return nbparallel.pmap("x + 1", "x", listed, pool=pool, show_progress=False)

    @contextmanager
    def no_telemetry() -> Iterator[Trial]:
        # What recording spans costs: the same map with nbparallel.config.telemetry off.
        was, config.telemetry = config.telemetry, False
        try:
            yield _one("map", mine, want)
        finally:
            config.telemetry = was

    # A cost of a few percent hides in run-to-run noise: these two compare medians of 15 runs.
    return (case(NB, _ready(_one("map", mine, want)), max(repeat, TELEMETRY_RUNS))
            + case(NO_TELEMETRY, no_telemetry, max(repeat, TELEMETRY_RUNS))
            + case(f"{NB}, a list of items", _ready(_one("map", mine_listed, want)))
            + case("ipyparallel chunksize=1", ipp(1)) + case("ipyparallel chunksize=100", ipp(100))
            + case("dask", dask if _dask_importable() else None)
            + case("joblib (loky)", loky if _importable("joblib") else None)
            + case("multiprocessing", processes)
            + work(NB, _ready(_one(WORK, busy, list(range(1, WORK_ITEMS + 1)))))
            + work("joblib (loky)", (lambda: loky(_spin, WORK_ITEMS, WORK))
                   if _importable("joblib") else None)
            + work("multiprocessing", lambda: processes(_spin, WORK_ITEMS, WORK))
            + work(f"ideal ({n} engines, no dispatch)", ideal))


def _roundtrip_group(pool: Session, n: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """A trivial cell's round trip against ipyparallel's ``%px pass``, in interleaved pairs
    (which goes first alternates), so that the machine's drift falls on both alike."""
    x = np.arange(max(8, n))  # at least one row per engine: more engines than rows is an error
    dv = pool.pool.client[pool.ids]
    cases = {NB: lambda: nbparallel.scatter("y = x", {"x": x}, gather=["y"], pool=pool)["y"],
             "ipyparallel %px pass": lambda: dv.execute("pass", block=True)}
    say(f"bench: roundtrip: {', '.join(cases)}: {ROUNDTRIP_CALLS} interleaved pairs")
    times: dict[str, list[float]] = {name: [] for name in cases}
    errors: dict[str, str] = {}

    def call(name: str, first: bool = False) -> None:
        if name in errors:
            return
        try:  # isolation: a broken case must not hide the other
            t0 = time.perf_counter()
            got = cases[name]()
            took = time.perf_counter() - t0
            if first:  # warm-up: imports, views, the engines' first cell; checked, untimed
                if name == NB:
                    _check(got, x)
                return
            times[name].append(took)
        except Exception as exc:
            errors[name] = f"error: {type(exc).__name__}: {exc}"

    for name in cases:
        call(name, first=True)
    for k in range(ROUNDTRIP_CALLS):
        for name in (list(cases) if k % 2 == 0 else list(cases)[::-1]):
            call(name)
    return [{"group": "roundtrip", "name": name, "what": ROUNDTRIP,
             "seconds_best": min(ts) if ts and name not in errors else None,
             "seconds_median": statistics.median(ts) if ts and name not in errors else None,
             "error": errors.get(name)} for name, ts in times.items()]


PER_MB = "per micro-batch"
# A row of ones asks the first stage for ACT bytes of activation, a row of zeros for the row itself.
SENDER = """
big = np.ones((1, ACT // 8))
def forward(x, ctx):
    return big if ACT and x[0, 0] else x
"""
RECEIVER = "def forward(x, ctx):\n    return x[:, :1].copy()\n"


def _pipeline_group(pool: Session, size_mb: int, repeat: int,
                    say: Callable[[str], None]) -> list[dict[str, Any]]:
    if len(pool.ids) < 2:
        return _measure("pipeline", NB, [HOP, PER_MB], None, repeat, say)
    act = size_mb * MB // HOP_MBS // 8 * 8
    moved = {HOP: act * HOP_MBS}

    @contextmanager
    def stages(nbytes: int, handoff: bool = True) -> Iterator[Pipeline]:
        # A pipeline of its own, with names of its own: the user's stages stay as they were.
        pipe = Pipeline(pool.pool, pool.plane, pool.monitor)
        pipe.handoff = handoff
        try:
            pipe.define("_nbp_bench_send", SENDER, pool.ids[0], {"np": np, "ACT": nbytes})
            pipe.define("_nbp_bench_recv", RECEIVER, pool.ids[1], {})
            yield pipe
        finally:
            pipe.clear()

    def hop(handoff: bool) -> Setup:
        # The bytes' own cost: the run with large activations minus the same run with 8-byte
        # ones, so the fixed cost of starting a run (the "trivial cell" row) is not counted.
        @contextmanager
        def setup() -> Iterator[Trial]:
            with stages(act, handoff) as pipe:
                ones, zeros = np.ones((HOP_MBS, 1)), np.zeros((HOP_MBS, 1))

                def trial(check: bool) -> dict[str, float]:
                    t0 = time.perf_counter()
                    got = pipe.run(ones, HOP_MBS)
                    t1 = time.perf_counter()
                    pipe.run(zeros, HOP_MBS)
                    t2 = time.perf_counter()
                    if check:
                        _check(got, ones)
                    return {HOP: max((t1 - t0) - (t2 - t1), 1e-9)}
                yield trial
        return setup

    @contextmanager
    def overhead() -> Iterator[Trial]:
        with stages(0) as pipe:
            x64, x1 = np.ones((64, 8)), np.ones((1, 8))

            def trial(check: bool) -> dict[str, float]:
                t0 = time.perf_counter()
                got = pipe.run(x64, 64)
                t1 = time.perf_counter()
                pipe.run(x1, 1)
                t2 = time.perf_counter()
                if check:
                    _check(got, x64[:, :1])
                return {PER_MB: ((t1 - t0) - (t2 - t1)) / 63}
            yield trial

    @contextmanager
    def copyto() -> Iterator[Trial]:
        src, dst = np.ones(act // 8), np.full(act // 8, -1.0)

        def copies() -> np.ndarray:
            for _ in range(HOP_MBS):
                np.copyto(dst, src)
            return dst[:1]
        yield _one(HOP, copies, src[:1])

    return (_measure("pipeline", NB, [HOP], hop(True), repeat, say, nbytes=moved)
            + _measure("pipeline", NB, [PER_MB], overhead, max(repeat, 5), say)
            + _measure("pipeline", "nbparallel over sockets", [HOP], hop(False), repeat, say,
                       nbytes=moved)
            + _measure("pipeline", "numpy.copyto", [HOP], copyto, repeat, say, nbytes=moved))


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _dask_importable() -> bool:
    try:  # importable, not just installed: a broken install counts as absent
        importlib.import_module("distributed")
    except ImportError:
        return False
    return True


# -- ratios ------------------------------------------------------------------------------------
def _ratios(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every other row against nbparallel's row of the same group and ``what``.

    Unit "x": how many times faster nbparallel is (the other's time / nbparallel's). Unit "%"
    (against ``numpy.copyto``): nbparallel's GB/s as a percentage of its GB/s, which for the same
    bytes is 100 times the same ratio. Latency, collectives and telemetry's cost compare
    medians; bandwidth and items the best runs.
    """
    mine = {(c["group"], c["what"]): c for c in cases if c["name"] == NB}
    out = {}
    for other in cases:
        nb = mine.get((other["group"], other["what"]))
        if other["name"] == NB or nb is None:
            continue
        stat = ("seconds_median" if other["group"] in ("roundtrip", "comm")
                or other["name"] == NO_TELEMETRY else "seconds_best")
        pct = other["name"] in CEILINGS
        a, b = nb[stat], other[stat]
        if pct and nb.get("gbps") and other.get("gbps"):  # the same as b / a for the same bytes
            a, b = 1 / nb["gbps"], 1 / other["gbps"]
        label = (f"{other['group']} {other['what']}: nbparallel "
                 f"{'GB/s as % of' if pct else 'vs'} {other['name']}")
        out[label] = {"value": b / a * (100 if pct else 1) if a and b else None,
                      "unit": "%" if pct else "x", "statistic": stat, "case": _key(nb),
                      "baseline": _key(other)}
    return out


def _key(case: dict[str, Any]) -> str:
    return f"{case['group']}/{case['name']}/{case['what']}"


# -- the machine -------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    return {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "numpy": np.__version__,
            "ipyparallel": _version("ipyparallel"), "dask": _version("distributed"),
            "nbparallel": nbparallel.__version__}


def _cpu_model() -> str:
    try:  # platform.processor() is often empty on Linux, where /proc/cpuinfo names the model
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        return next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- rendering ---------------------------------------------------------------------------------
HEADER = ["group", "case", "what", "best", "median", "throughput", "nbparallel vs this / note"]


def _summary(report: dict[str, Any]) -> tuple[str, str]:
    m = report["machine"]
    return (f"nbparallel bench, {report['date']}: {report['engines']} engines, {report['size_mb']} MB, "
            f"{report['items']} items, best and median of {report['repeat']}, transport "
            f"{report['transport']}",
            f"{m['platform']}; {m['cpu']}; {m['cpu_count']} CPUs ({m['physical_cores']} physical); "
            f"{m['ram_gib']} GiB RAM; Python {m['python']}; numpy {m['numpy']}; ipyparallel "
            f"{m['ipyparallel']}; dask {m['dask'] or 'not installed'}")


def _seconds(s: float | None) -> str:
    return "-" if s is None else seconds(s)


def _rows(report: dict[str, Any], width: int | None) -> list[list[str]]:
    notes = {r["baseline"]: r for r in report["ratios"].values()}
    rows = []
    for c in report["cases"]:
        if c.get("gbps"):
            rate = f"{c['gbps']:.2f} GB/s"
        elif c.get("items_per_s"):
            rate = f"{c['items_per_s']:,.0f} items/s"
        else:
            rate = "-"
        ratio = notes.get(f"{c['group']}/{c['name']}/{c['what']}")
        note = c["error"] or (_ratio_text(ratio) if ratio else "")
        note = note.strip().splitlines()[0] if note.strip() else ""
        if width and len(note) > width:
            note = note[: width - 3] + "..."
        rows.append([c["group"], c["name"], c["what"], _seconds(c["seconds_best"]),
                     _seconds(c["seconds_median"]), rate, note])
    return rows


def _ratio_text(ratio: dict[str, Any]) -> str:
    v = ratio["value"]
    if v is None:
        return "n/a"
    if ratio["unit"] == "%":
        return f"nbparallel at {v:.0f}% of its GB/s"
    return f"nbparallel {v:.2f}x faster" if v >= 1 else f"nbparallel {1 / v:.2f}x slower"


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned plain-text table, two header lines first."""
    rows = [HEADER] + _rows(report, 70)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*_summary(report), "", *lines])


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table, after one line naming the machine and the date."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    title, machine_line = _summary(report)
    body = [line(HEADER), "|" + "|".join("---" for _ in HEADER) + "|"]
    body += [line(r) for r in _rows(report, 120)]
    return "\n".join([f"{title}. {machine_line}.", "", *body])
