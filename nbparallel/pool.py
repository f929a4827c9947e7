"""The engine pool: start an embedded cluster or connect to one, list engines, submit work.

This module and ``engine/`` are the only ones that know ipyparallel's API. Everything above it
asks a :class:`Pool` to run a function on an engine, gets back a future, and waits for futures
in the pool's one wait loop (:meth:`Pool.wait`), which ticks the dashboard, notices a lost
controller or a dead engine, and turns Ctrl-C into interrupts. The pool builds nothing else: the
data plane, the monitor and the pipeline are built beside it by ``session.py``.

In a notebook, through the session that holds it::

    import nbparallel
    session = nbparallel.start(n=2)     # or %nbp start -n 2
    session.status()                    # engine id, host, pid, device, busy/idle
    session.stop()                      # only stops what nbparallel started

GPUs: when the pool starts or connects, each engine is bound to one CUDA device, round-robin over
the devices it sees by its rank among the engines of its host (``gpus="all"``, the default when
there are any), to the devices listed (``gpus=[0, 1]``), or to none (``gpus="none"``); see
``gpu.py``. Engines that join later are bound the same way when the pool first sees them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import cloudpickle

from . import gpu, ipcluster
from .controller import ControllerWatch, connection_file, controller_pids, flags
from .relay import Relay
from . import reaper
from .cores import thread_limits, usable_cores
from .engine.runner import bind_gpu, limit_threads, probe_gpus, run_packed
from .errors import ControllerLost, PoolError, RemoteError, RemoteFailure, UsageError
from .format import ranges
from .partition import parse_engines

__all__ = ["EngineInfo", "Pool", "Waited"]

CONNECT_TIMEOUT = 5.0
ENGINE_TIMEOUT = 120.0
#: How long connecting waits for an engine's first answer before calling it busy.
PROBE_TIMEOUT = 5.0
TICK = 0.1  # seconds between looks while engines work: the dashboard, the controller, Ctrl-C
STOP_GRACE = 10.0  # seconds interrupted engines get to answer before their futures are left


@dataclass(frozen=True)
class Waited:
    """What :meth:`Pool.wait` saw: the futures not finished, and whether it stopped them
    because ``stop_if`` said so (an engine died, a stage failed)."""

    pending: frozenset[Any]
    stopped: bool = False


@dataclass(frozen=True)
class EngineInfo:
    """One row of ``%nbp status``."""

    id: int
    host: str
    pid: int
    device: str  #: "cpu", or the bound GPU as "cuda:0 NVIDIA H200" (NVML's name on this host)
    busy: bool
    gpu_uuid: str | None = None
    gpu_mem: int | None = None  #: bytes used on the device (NVML; engines on this host only)
    gpu_mem_total: int | None = None
    alive: bool = True  #: False: it was part of this pool and has stopped (killed, crashed)
    mpi_rank: int | None = None  #: its rank in its MPI world, for engines that are MPI ranks
    replaced_by: int | None = None  #: the engine that took its rank, for a dead one


class Pool:
    """A connection to ipyparallel engines, and the cluster behind it if nbparallel started it."""

    def __init__(self, client: Any, cluster: Any | None = None, how: str = "connected",
                 gpus: str | Sequence[int] | None = None):
        self.client = client
        self.cluster = cluster
        self.how = how
        self.gpus = gpu.parse_gpus(gpus)
        #: One line about the GPU binding worth telling the user (e.g. --gpus all found none).
        self.gpu_note: str | None = None
        self._stopped = False
        #: How Pool.start made this pool (n, profile, gpus), for restart(); empty when connected.
        self.started_with: dict[str, Any] = {}
        #: The profile and cluster id Pool.connect found the cluster by; empty when started.
        self.connected_with: dict[str, Any] = {}
        self._nvml: gpu.Nvml | None = None
        self._info: dict[int, dict[str, Any]] = {}
        #: Engines of a connected cluster whose first answer has not come (busy with another
        #: client's work, or stuck): not in :attr:`ids` until it does.
        self._late: dict[int, Any] = {}
        #: What connecting found worth telling (fewer engines than launched), or None.
        self.connect_note: str | None = None
        self._views: dict[int, Any] = {}  # one DirectView per engine, made on first use
        #: Whether dead engines are replaced (``respawn.py``): a pool nbparallel started.
        self.respawn = False
        #: The engines in rank order, when replacements keep ranks (empty: sorted ids).
        self.order: list[int] = []
        #: Old engine -> the engine that replaced it; ranks given up on; replacement times.
        self.replaced: dict[int, int] = {}
        self.given_up: set[int] = set()
        self.replaced_at: dict[int, list[float]] = {}
        self._reaper: subprocess.Popen | None = None
        #: The controller and its scheduler processes, when nbparallel started them: a controller
        #: killed alone leaves its schedulers behind, and stop() must not.
        self._controller_pids = controller_pids(cluster)
        self._controller = ControllerWatch(
            None if getattr(client, "_ssh", False) else client._config.get("registration"),
            self._controller_pids[:1])
        self._refresh_info(strict=True)

    # -- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def start(cls, n: int | None = None, *, profile: str | None = None,
              timeout: float = ENGINE_TIMEOUT, gpus: str | Sequence[int] | None = None,
              respawn: bool = True) -> "Pool":
        """Start an embedded local cluster of ``n`` engines (default: one per CPU core).

        ``gpus``: ``"all"`` (the default when the engines see a CUDA device), ``"none"``, or
        device numbers such as ``[0, 1]``; each engine gets one, round-robin. ``respawn``:
        an engine that dies is replaced, in its rank, before the next magic runs.
        """
        import ipyparallel as ipp

        if n is None:
            n = usable_cores()
        if n < 1:
            raise UsageError(f"-n must be at least 1, not {n}.")
        gpu.parse_gpus(gpus)  # a misspelt --gpus fails before any engine starts
        # ipyparallel 9 engines exit with code 1 even on a clean stop, which it reports as a
        # warning with each engine's whole log; our own errors cover every real failure.
        kwargs: dict[str, Any] = {"n": n, "log_level": logging.ERROR}
        if profile:
            kwargs["profile"] = profile
        cluster = ipp.Cluster(**kwargs)
        cluster.config.BaseLauncher.environment = thread_limits(n)
        try:
            cluster.start_cluster_sync()
            client = cluster.connect_client_sync()
            client.wait_for_engines(n, timeout=timeout, interactive=False)
        except Exception as exc:
            try:
                cluster.stop_cluster_sync()
            finally:
                raise PoolError(
                    f"could not start a local cluster of {n} engines: {type(exc).__name__}: {exc}. "
                    f"Check that `ipengine` runs in this environment, or try fewer engines."
                ) from exc
        try:
            pool = cls(client, cluster, how="started", gpus=gpus)
        except BaseException:  # e.g. --gpus 0,1 on engines without those devices
            try:
                client.close()
            finally:
                cluster.stop_cluster_sync()
            raise
        pool._spawn_reaper()
        pool.started_with = {"n": n, "profile": profile, "timeout": timeout, "gpus": gpus,
                             "respawn": respawn}
        pool.respawn = respawn
        pool.order = sorted(client.ids)
        return pool

    def adopt(self, mapping: dict[int, int]) -> None:
        """Engines ``mapping`` values replaced its keys: each takes the old one's rank, is
        bound to its GPU and watched like the rest."""
        self.order = [mapping.get(e, e) for e in self.order]
        self.replaced.update(mapping)
        for old in mapping:
            self._views.pop(old, None)
        self._refresh_info()
        if self._reaper is not None:  # a new watchdog that knows the new engines' pids
            self._reaper.terminate()
            self._reaper.wait(timeout=10)
        self._spawn_reaper()

    @classmethod
    def connect(cls, profile: str | None = None, cluster_id: str | None = None,
                timeout: float = CONNECT_TIMEOUT, gpus: str | Sequence[int] | None = None,
                wait: float | None = None, n: int | None = None,
                say: Callable[[str], None] = print) -> "Pool":
        """Attach to a cluster started with ``ipcluster start`` (its engines are never stopped here).

        Without ``wait``, the cluster must have ``n`` engines (default 1) within ``timeout``
        seconds; otherwise a :class:`PoolError` says what was found (the controller, the engines
        so far, a batch job still queued). With ``wait`` (seconds), it waits that long for ``n``
        engines (default: as many as ``ipcluster`` launched), telling ``say`` how many have
        come, and connects to those that came in time. Engines busy with other work (they do
        not answer within :data:`PROBE_TIMEOUT`) are reported and join once they answer.
        Engines are bound to GPUs as :meth:`start` does, the local rank of an engine being its
        index among the engines of its host.

        >>> pool = Pool.connect(cluster_id="slurm", wait=600, n=16)   # %nbp connect --wait -n 16
        """
        import ipyparallel as ipp

        gpu.parse_gpus(gpus)
        if wait is not None and not 0 <= wait < float("inf"):
            raise UsageError(f"--wait takes a number of seconds, 0 or more, not {wait:g}.")
        if n is not None and n < 1:
            raise UsageError(f"-n takes a number of engines, 1 or more, not {n}.")
        url_file = connection_file(profile, cluster_id)
        named = flags(profile, cluster_id)
        if not url_file.exists():
            raise PoolError(f"no cluster to connect to: {url_file} does not exist. "
                            + ipcluster.no_cluster_advice(profile, named))
        down = ipcluster.controller_down(url_file)
        if down is not None:
            raise PoolError(
                f"the cluster described by {url_file} is not running: {down}. The file is left "
                f"from a cluster that stopped: `ipcluster stop{named}` removes it, and "
                f"`ipcluster start -n 4{named}` starts a new one."
            )
        try:
            client = ipp.Client(str(url_file), timeout=timeout)
        except Exception as exc:
            raise PoolError(
                f"could not reach the cluster described by {url_file} within {timeout:.0f} s "
                f"({type(exc).__name__}: {exc}). It may have stopped: start it again with "
                f"`ipcluster start -n 4{named}`, or use `%nbp start`."
            ) from None
        try:
            found = ipcluster.await_engines(lambda: len(client.ids), url_file,
                                            ipcluster.launched(profile, cluster_id), named,
                                            timeout, wait, n, say)
            pool = cls(client, None, how="connected", gpus=gpus)
        except BaseException:
            client.close()
            raise
        pool._spawn_reaper(engines=False)
        pool.connected_with = {"profile": profile, "cluster_id": cluster_id}
        pool.connect_note = found
        return pool

    def info(self, engine: int) -> dict[str, Any]:
        """Host, pid and device of ``engine`` (empty if it is unknown or gone)."""
        if engine not in self._info and engine in self.ids:
            self._refresh_info()
        return self._info.get(engine, {})

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def key(self) -> bytes:
        """The cluster's key: every data-plane message is signed with it."""
        return self.client.session.key

    def stop(self) -> None:
        """Stop the cluster if nbparallel started it; otherwise only disconnect. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                ours = self._controller_pids + [i["pid"] for i in self._info.values()]
                try:
                    if self._controller.lost is not None:
                        # ipyparallel's stop waits 10 s for busy engines to leave a controller
                        # that is gone; they have nothing left to save.
                        reaper.stop_processes(ours, grace=1.0)
                    self.cluster.stop_cluster_sync()
                finally:
                    self.cluster = None
                    # What ipyparallel could not stop: the schedulers of a controller that was
                    # killed alone, engines it lost track of.
                    reaper.stop_processes(ours)
            if self._reaper is not None:
                if self.how == "connected":
                    self._reaper.terminate()  # it only watched for segments; they are gone now
                self._reaper.wait(timeout=10)
                self._reaper = None

    def _spawn_reaper(self, engines: bool = True) -> None:
        if not engines:  # a connected cluster's engines are not ours to stop
            self._reaper = reaper.spawn(os.getpid(), [])
            return
        pids = [info["pid"] for info in self._info.values()] + self._controller_pids
        self._reaper = reaper.spawn(os.getpid(), pids)

    # -- engines -------------------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """The engines work can go to, in rank order: those registered, less the :attr:`late`
        ones (sorted, unless a replacement took a dead engine's rank: see ``respawn.py``)."""
        ids = sorted(self.client.ids)
        if self.replaced:
            live = set(ids)
            ids = [e for e in self.order if e in live] + [e for e in ids if e not in self.order]
        if self._late:
            for e in [e for e, probe in self._late.items() if probe.done() or e not in ids]:
                del self._late[e]  # it answered (it is learnt on first use) or it has gone
            ids = [e for e in ids if e not in self._late]
        return ids

    @property
    def late(self) -> list[int]:
        """Engines of a connected cluster that have not answered yet, e.g. busy with another
        client's work; they join :attr:`ids` when they answer."""
        self.ids  # noqa: B018 - forgets the late engines that have answered
        return sorted(self._late)

    def _answering(self, engines: list[int]) -> list[int]:
        """Those of ``engines`` (of a connected cluster, not learnt yet) that answer a trivial
        request within :data:`PROBE_TIMEOUT`; the others are :attr:`late`, their request left
        queued, so that the next look finds them answered without waiting again."""
        fresh = [e for e in engines if e not in self._late]
        probes = {e: self.apply(e, os.getpid) for e in fresh}
        # Not the wait loop: its Ctrl-C would interrupt the other client's work on them.
        concurrent.futures.wait(list(probes.values()), timeout=PROBE_TIMEOUT)
        self._late.update({e: f for e, f in probes.items() if not f.done()})
        return [e for e in engines if e not in self._late]

    def _refresh_info(self, strict: bool = False) -> None:
        """Learn the engines not seen yet, binding each to its GPU (see :func:`gpu.plan`).

        ``strict`` (when the pool is made) lets a request for devices an engine lacks raise a
        UsageError; an engine that joins later without them runs on the CPU instead.
        """
        missing = [i for i in self.ids if i not in self._info]
        if self.how == "connected" and missing:
            missing = self._answering(missing)
        if not missing:
            return
        visible: dict[int, list[int]] = {}
        if self.gpus == "none":  # the engines never import CuPy
            choice: dict[int, int | None] = {e: None for e in missing}
        else:
            answers = self.call_each(missing, probe_gpus, what="the CUDA devices it sees",
                                     strict=True)
            probes = [answers[e] for e in missing]
            visible = {e: p["visible"] for e, p in zip(missing, probes)}
            table = [(e, i.get("host", "?"), i.get("visible", [])) for e, i in self._info.items()]
            table += [(e, p["host"], p["visible"]) for e, p in zip(missing, probes)]
            try:
                choice, note = gpu.plan(self.gpus, table)
            except UsageError:
                if strict:
                    raise
                choice = {e: None for e in missing}
                note = (f"nbparallel: engine(s) {ranges(missing)} joined without the CUDA devices "
                        f"--gpus asked for; they run on the CPU.")
            if note:
                self.gpu_note = note
        futures = [self.apply(e, bind_gpu, choice[e]) for e in missing]
        infos = self.answers(futures, missing, what="its GPU binding and host facts", strict=True)
        for e in missing:
            self._info[e] = {**infos[e], "visible": visible.get(e, [])}
        if self.how == "connected":
            self._share_cores([self._info[e].get("host") for e in missing])

    def _share_cores(self, hosts: Sequence[Any]) -> None:
        """The BLAS-thread rule of :meth:`start`, for engines that were already running: each
        host's cores shared among its engines (again when more of them join)."""
        count: dict[Any, int] = {}
        for info in self._info.values():
            count[info.get("host")] = count.get(info.get("host"), 0) + 1
        engines = [e for e, info in self._info.items() if info.get("host") in set(hosts)]
        futures = [self.apply(e, limit_threads, count[self._info[e].get("host")]) for e in engines]
        self.answers(futures, engines, what="its BLAS thread limit")  # best effort: not strict

    def _nvml_reader(self) -> gpu.Nvml:
        if self._nvml is None:
            self._nvml = gpu.Nvml()
        return self._nvml

    def gpu_metrics(self, engine: int) -> tuple[float | None, int | None, int | None]:
        """``(utilisation %, memory used, memory total)`` of ``engine``'s GPU, from NVML.

        Only for an engine bound to a GPU on this host (NVML sees this host's devices); all None
        otherwise, or without ``pynvml``. NVML is loaded on the first call that needs it.
        """
        info = self.info(engine)
        device = info.get("gpu")
        if not device or info.get("host") != socket.gethostname():
            return None, None, None
        return self._nvml_reader().metrics(device)

    def status(self) -> list[EngineInfo]:
        """One :class:`EngineInfo` per engine this pool has had, by id; stopped ones have
        ``alive=False`` (``%nbp restart`` brings a started pool back to full strength)."""
        self.check_controller(force=True)  # queue_status would wait forever for a lost one
        self._refresh_info()
        queues = self.client.queue_status()
        rows = []
        for eid in sorted(set(self._info) - set(self.ids)):
            info = self._info[eid]
            rows.append(EngineInfo(eid, info.get("host", "?"), info.get("pid", -1),
                                   info.get("device", "?"), False, alive=False,
                                   replaced_by=self.replaced.get(eid)))
        for eid in self.ids:
            q = queues.get(eid, {})
            info = self._info.get(eid, {})
            device, uuid, used, total = info.get("device", "?"), None, None, None
            bound = info.get("gpu")
            if bound:
                uuid, total = bound.get("uuid"), bound.get("total")
                if info.get("host") == socket.gethostname():
                    name = self._nvml_reader().name(bound)
                    if name:
                        device = f"cuda:{bound['index']} {name}"
                    _, used, nv_total = self._nvml_reader().metrics(bound)
                    total = nv_total or total
            mpi = info.get("mpi") or {}
            rows.append(EngineInfo(eid, info.get("host", "?"), info.get("pid", -1), device,
                                   bool(q.get("queue", 0) or q.get("tasks", 0)), uuid, used,
                                   total, mpi_rank=mpi.get("rank")))
        return sorted(rows, key=lambda row: row.id)

    def check_controller(self, force: bool = False, cheap: bool = False) -> None:
        """Raise :class:`ControllerLost` if the cluster's controller has gone.

        Cheap enough for every wait loop: it looks at most once a second unless ``force``, or
        ``cheap`` for a controller whose process this kernel watches (once per magic).
        """
        reason = self._controller.check(force, cheap)
        if reason is None:
            return
        if self.how == "started":
            way = (f"`%nbp restart` (nbparallel.restart()) clears what is left of it and starts "
                   f"a fresh local cluster of {self.started_with.get('n', len(self._info))} engines")
        else:
            named = flags(self.connected_with.get("profile"), self.connected_with.get("cluster_id"))
            way = (f"start the cluster again where it runs (`ipcluster start -n "
                   f"{len(self._info)}{named}`), then run `%nbp connect{named}`")
        raise ControllerLost(
            f"the cluster's controller has stopped: {reason}. No work can reach the engines and "
            f"no result can come back, so this pool cannot be used again, and values kept on its "
            f"engines (--keep, %%stage parameters) are lost with it. Your notebook variables are "
            f"as they were. To go on, {way}."
        )

    def alive(self, engines: Sequence[int]) -> list[int]:
        """Those of ``engines`` still registered with the controller."""
        live = set(self.client.ids)
        return [e for e in engines if e in live]

    def select(self, spec: str | Sequence[int] | None) -> list[int]:
        """Engine ids from ``"0-3,6"``, a list, or None for all; unknown ids are an error."""
        self.check_controller(cheap=True)  # every magic starts here: a dead controller says so now
        available = self.ids
        if not available:
            raise PoolError("the pool has no engines; start some with `%nbp start`.")
        if spec is None:
            return available
        wanted = parse_engines(spec) if isinstance(spec, str) else list(spec)
        known = set(available)
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise UsageError(
                f"--engines names engine(s) {ranges(unknown)}, which the pool does "
                f"not have; available: {ranges(available)}."
            )
        if not wanted:
            raise UsageError("--engines selected no engines.")
        return wanted

    # -- work ----------------------------------------------------------------------------------
    def apply(self, engine: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on one engine; returns a future (an ipyparallel AsyncResult)."""
        self.check_controller()
        view = self._views.get(engine)
        try:
            if view is None:
                # Kept: a fresh DirectView per task cost about 50 us of every apply.
                view = self._views[engine] = self.client[engine]
            elif engine not in self.client.ids:
                raise IndexError(engine)
        except IndexError:  # it died after the engines for this call were chosen
            self._views.pop(engine, None)
            raise PoolError(
                f"engine {engine} has stopped (the controller no longer lists it), so the work "
                f"for it was not sent. `%nbp status` shows the engines left; run the cell again."
            ) from None
        return view.apply_async(fn, *args)

    def apply_packed(self, engine: int, fn: Callable[..., Any], *args: Any) -> Any:
        """:meth:`apply` with ``fn`` and its arguments in one cloudpickled buffer: ipyparallel's
        serializer walks every argument and container (a quarter of a small cell's notebook
        time), one pickle costs a fraction of that. For small arguments: big buffers are
        copied into the pickle, where ``apply`` would send them as they are."""
        return self.apply(engine, run_packed, cloudpickle.dumps((fn, args)))

    def interrupt(self, futures: Sequence[Any], engines: Sequence[int]) -> None:
        """Stop work after Ctrl-C: drop what is queued, interrupt what runs (SIGINT on engines)."""
        pending = [f for f in futures if not f.done()]
        alive = self.alive(engines)
        try:
            if pending:
                self.client.abort(pending, block=False)
            if alive:
                self.client.send_signal("SIGINT", targets=alive, block=True)
        except Exception:
            pass  # best effort: the user asked to stop, and gets control back either way

    def wait(self, futures: Sequence[Any], engines: Sequence[int], *,
             tick: Callable[[], None] | None = None, first: bool = False,
             stop_if: Callable[[Any], bool] | None = None,
             timeout: float | None = None) -> Waited:
        """The one wait loop: until every future is done (or the first is, with ``first``, or
        ``timeout`` seconds have passed: then the futures still pending are in the answer).

        Every :data:`TICK` it calls ``tick`` (the dashboard) and checks the controller, so a lost
        one raises :class:`ControllerLost` in about a second instead of a hang. When a finished
        future makes ``stop_if`` true (its engine died, a stage failed), the rest cannot
        complete: their engines are interrupted and get :data:`STOP_GRACE` seconds to answer.
        Ctrl-C interrupts every engine in ``engines`` and is raised again. Nothing here waits
        for ever without looking: a cell that runs for hours is still watched every tick.
        """
        pending = set(futures)
        end = None if timeout is None else time.monotonic() + timeout
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=TICK,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                if tick is not None:
                    tick()
                if stop_if is not None and pending and any(stop_if(f) for f in done):
                    left = [e for e, f in zip(engines, futures) if f in pending]
                    self.interrupt(list(pending), left)
                    concurrent.futures.wait(pending, timeout=STOP_GRACE)
                    return Waited(frozenset(f for f in pending if not f.done()), stopped=True)
                if (first and done) or (end is not None and time.monotonic() > end):
                    break
                if pending:
                    self.check_controller()
        except KeyboardInterrupt:
            self.interrupt(list(futures), list(engines))
            raise
        return Waited(frozenset(pending))

    def outcome(self, future: Any, engine: int, **where: Any) -> tuple[Any, RemoteFailure | None]:
        """A finished future's reply, or the failure it stands for (never raises)."""
        try:
            return future.result(timeout=0), None
        except Exception as exc:
            return None, self.failure(exc, engine, **where)

    def results(self, futures: Sequence[Any], engines: Sequence[int], what: str) -> list[Any]:
        """The replies of finished ``futures``, one per engine; any failure raises
        :class:`RemoteError` naming ``what`` and every engine that failed."""
        replies, failures = [], []
        for rank, (eid, fut) in enumerate(zip(engines, futures)):
            reply, failure = self.outcome(fut, eid, rank=rank)
            if failure is not None:
                failures.append(failure)
            replies.append(reply)
        if failures:
            raise RemoteError(what, failures)
        return replies

    def call(self, engine: int, fn: Callable[..., Any], *args: Any, timeout: float = ENGINE_TIMEOUT,
             what: str = "an answer") -> Any:
        """``fn(*args)`` on ``engine``, waited for in the wait loop for at most ``timeout`` s."""
        return self.call_each([engine], fn, *args, timeout=timeout, what=what, strict=True)[engine]

    def call_each(self, engines: Sequence[int], fn: Callable[..., Any], *args: Any,
                  timeout: float = ENGINE_TIMEOUT, what: str = "an answer",
                  strict: bool = False) -> dict[int, Any]:
        """``fn(*args)`` on every engine of ``engines`` at once; their answers by engine id.

        Engines that fail or do not answer within ``timeout`` seconds are left out, unless
        ``strict``: then the first such raises (:class:`RemoteError`, or :class:`PoolError`
        saying what was awaited and from whom).
        """
        return self.answers([self.apply(e, fn, *args) for e in engines], engines,
                            timeout=timeout, what=what, strict=strict)

    def answers(self, futures: Sequence[Any], engines: Sequence[int], *,
                timeout: float = ENGINE_TIMEOUT, what: str = "an answer",
                strict: bool = False) -> dict[int, Any]:
        """Wait (in the wait loop, at most ``timeout`` s) for one future per engine; their
        answers by engine id, as :meth:`call_each` gives them."""
        late = self.wait(futures, engines, timeout=timeout).pending
        if strict and late:
            raise PoolError(
                f"engine(s) {ranges([e for e, f in zip(engines, futures) if f in late])} did not "
                f"send {what} within {timeout:g} s; they may be busy with another client's work "
                f"or stuck. `%nbp status` shows them; Ctrl-C or `%nbp restart` gets them back."
            )
        out = {}
        for eid, fut in zip(engines, futures):
            if fut in late:
                continue
            reply, failure = self.outcome(fut, eid)
            if failure is not None:
                if strict:
                    raise RemoteError(f"waiting for {what}", [failure])
                continue
            out[eid] = reply
        return out

    def failure(self, exc: BaseException, engine: int | None, **where: Any) -> RemoteFailure:
        """Describe a future's exception: an engine that died, or an error outside the cell."""
        import ipyparallel as ipp

        # A dead engine arrives as EngineError, or as a RemoteError that wraps one.
        if isinstance(exc, ipp.error.EngineError) or getattr(exc, "ename", "") == "EngineError":
            return self.died(engine if engine is not None else -1, f" ({exc})", **where)
        if isinstance(exc, ipp.error.RemoteError):
            info = getattr(exc, "engine_info", None) or {}
            eid = info.get("engine_id", engine if engine is not None else -1)
            return RemoteFailure(eid, exc.ename, exc.evalue, exc.render_traceback() and
                                 "\n".join(exc.render_traceback()), **where)
        return RemoteFailure(engine if engine is not None else -1, type(exc).__name__, str(exc),
                             "", **where)

    @staticmethod
    def died(engine: int, detail: str = "", **where: Any) -> RemoteFailure:
        """The failure of work lost because ``engine`` stopped; ``detail`` follows the reason."""
        return RemoteFailure(engine, "EngineDied",
                             f"the engine stopped while running this work{detail}",
                             "The engine process exited (killed, crashed or out of memory). "
                             "`%nbp status` shows the engines still alive.\n", **where)

    def published(self, future: Any) -> dict[str, Any]:
        """What the task behind ``future`` published so far (``engine/live.py``), by key."""
        try:
            return dict(future.data)  # the client's IO thread merges new keys into this dict
        except Exception:
            return {}

    def relay_output(self, future: Any, engine: int, relay: Relay | None = None) -> None:
        """Print what an engine printed while running ``future`` (what ``relay`` has not
        printed already while it ran), each line labelled by engine."""
        try:
            future.wait_for_output(timeout=2)
        except Exception:
            pass  # output that never arrives is not worth failing a cell for
        (relay or Relay()).show(future, engine, final=True)

    def __repr__(self) -> str:
        return f"<nbparallel.Pool {self.how}, engines {ranges(self.ids) or 'none'}>"

