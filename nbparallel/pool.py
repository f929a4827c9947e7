"""The engine pool: start an embedded cluster or connect to one, list engines, submit work.

This module and ``engine/`` are the only ones that know ipyparallel's API. Everything above it
asks a :class:`Pool` to run a function on an engine and gets back a future.

In a notebook::

    import nbparallel
    pool = nbparallel.start(n=2)        # or %nbp start -n 2
    pool.status()                       # engine id, host, pid, device, busy/idle
    pool.stop()                         # only stops what nbparallel started

GPUs: when the pool starts or connects, each engine is bound to one CUDA device, round-robin over
the devices it sees by its rank among the engines of its host (``gpus="all"``, the default when
there are any), to the devices listed (``gpus=[0, 1]``), or to none (``gpus="none"``); see
``gpu.py``. Engines that join later are bound the same way when the pool first sees them.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import gpu
from .controller import ControllerWatch
from .cores import thread_limits, usable_cores
from .errors import ControllerLost, PoolError, RemoteFailure, UsageError
from .partition import parse_engines

__all__ = ["EngineInfo", "Pool", "start", "connect", "current", "ensure", "stop"]

CONNECT_TIMEOUT = 5.0
ENGINE_TIMEOUT = 120.0


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
        self._reaper: subprocess.Popen | None = None
        self._lbview: Any = None
        self._plane: Any = None
        self._pipeline: Any = None
        self._monitor: Any = None
        #: The controller and its scheduler processes, when nbparallel started them: a controller
        #: killed alone leaves its schedulers behind, and stop() must not.
        self._controller_pids = _controller_pids(cluster)
        self._controller = ControllerWatch(
            None if getattr(client, "_ssh", False) else client._config.get("registration"),
            self._controller_pids[:1])
        self._refresh_info(strict=True)

    # -- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def start(cls, n: int | None = None, *, profile: str | None = None,
              timeout: float = ENGINE_TIMEOUT, gpus: str | Sequence[int] | None = None) -> "Pool":
        """Start an embedded local cluster of ``n`` engines (default: one per CPU core).

        ``gpus``: ``"all"`` (the default when the engines see a CUDA device), ``"none"``, or
        device numbers such as ``[0, 1]``; each engine gets one, round-robin.
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
        pool.started_with = {"n": n, "profile": profile, "timeout": timeout, "gpus": gpus}
        return pool

    @classmethod
    def connect(cls, profile: str | None = None, cluster_id: str | None = None,
                timeout: float = CONNECT_TIMEOUT, gpus: str | Sequence[int] | None = None) -> "Pool":
        """Attach to a cluster started with ``ipcluster start`` (its engines are never stopped here).

        Its engines are bound to GPUs as :meth:`start` does, the local rank of an engine being
        its index among the engines of its host.
        """
        import ipyparallel as ipp

        gpu.parse_gpus(gpus)
        url_file = _connection_file(profile, cluster_id)
        if not url_file.exists():
            raise PoolError(
                f"no cluster to connect to: {url_file} does not exist. Start one in a terminal with "
                f"`ipcluster start -n 4{_flags(profile, cluster_id)}`, or use `%nbp start` for a "
                f"local one."
            )
        try:
            client = ipp.Client(str(url_file), timeout=timeout)
        except Exception as exc:
            raise PoolError(
                f"could not reach the cluster described by {url_file} within {timeout:.0f} s "
                f"({type(exc).__name__}: {exc}). It may have stopped: start it again with "
                f"`ipcluster start -n 4{_flags(profile, cluster_id)}`, or use `%nbp start`."
            ) from None
        try:
            client.wait_for_engines(1, timeout=timeout, interactive=False)
        except Exception:
            client.close()
            raise PoolError(
                f"the cluster at {url_file} answered but has no engines after {timeout:.0f} s. "
                f"Start some with `ipcluster engines -n 4{_flags(profile, cluster_id)}`."
            ) from None
        try:
            pool = cls(client, None, how="connected", gpus=gpus)
        except BaseException:
            client.close()
            raise
        pool._spawn_reaper(engines=False)
        pool.connected_with = {"profile": profile, "cluster_id": cluster_id}
        return pool

    @property
    def plane(self) -> Any:
        """This pool's :class:`~nbparallel.dataplane.plane.DataPlane` (made on first use)."""
        if self._plane is None:
            from .dataplane.plane import DataPlane

            self._plane = DataPlane(self)
        return self._plane

    @property
    def pipeline(self) -> Any:
        """This pool's :class:`~nbparallel.pipeline.runtime.Pipeline` of stages."""
        if self._pipeline is None:
            from .pipeline.runtime import Pipeline

            self._pipeline = Pipeline(self)
        return self._pipeline

    @property
    def monitor(self) -> Any:
        """This pool's :class:`~nbparallel.monitor.Monitor`: spans, load samples, dashboards."""
        if self._monitor is None:
            from .monitor import Monitor

            self._monitor = Monitor(self)
        return self._monitor

    def info(self, engine: int) -> dict[str, Any]:
        """Host, pid and device of ``engine`` (empty if it is unknown or gone)."""
        if engine not in self._info and engine in self.ids:
            self._refresh_info()
        return self._info.get(engine, {})

    @property
    def transfers(self) -> Any:
        """The ring of :class:`~nbparallel.telemetry.Transfer` records of this pool."""
        return self.plane.transfers

    def stop(self) -> None:
        """Stop the cluster if nbparallel started it; otherwise only disconnect. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._monitor is not None:
                self._monitor.close()
            if self._plane is not None:
                self._plane.close(engines_live_on=self.cluster is None)
        finally:
            self._close()

    def _close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                from .reaper import stop_processes

                ours = self._controller_pids + [i["pid"] for i in self._info.values()]
                try:
                    if self._controller.lost is not None:
                        # ipyparallel's stop waits 10 s for busy engines to leave a controller
                        # that is gone; they have nothing left to save.
                        stop_processes(ours, grace=1.0)
                    self.cluster.stop_cluster_sync()
                finally:
                    self.cluster = None
                    # What ipyparallel could not stop: the schedulers of a controller that was
                    # killed alone, engines it lost track of.
                    stop_processes(ours)
            if self._reaper is not None:
                if self.how == "connected":
                    self._reaper.terminate()  # it only watched for segments; they are gone now
                self._reaper.wait(timeout=10)
                self._reaper = None

    def _spawn_reaper(self, engines: bool = True) -> None:
        from . import reaper

        if not engines:  # a connected cluster's engines are not ours to stop
            self._reaper = reaper.spawn(os.getpid(), [])
            return
        pids = [info["pid"] for info in self._info.values()] + self._controller_pids
        self._reaper = reaper.spawn(os.getpid(), pids)

    # -- engines -------------------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        return sorted(self.client.ids)

    def _refresh_info(self, strict: bool = False) -> None:
        """Learn the engines not seen yet, binding each to its GPU (see :func:`gpu.plan`).

        ``strict`` (when the pool is made) lets a request for devices an engine lacks raise a
        UsageError; an engine that joins later without them runs on the CPU instead.
        """
        from .engine.runner import bind_gpu, probe_gpus

        missing = [i for i in self.ids if i not in self._info]
        if not missing:
            return
        visible: dict[int, list[int]] = {}
        if self.gpus == "none":  # the engines never import CuPy
            choice: dict[int, int | None] = {e: None for e in missing}
        else:
            probes = self.client[missing].apply_async(probe_gpus).get(timeout=ENGINE_TIMEOUT)
            visible = {e: p["visible"] for e, p in zip(missing, probes)}
            table = [(e, i.get("host", "?"), i.get("visible", [])) for e, i in self._info.items()]
            table += [(e, p["host"], p["visible"]) for e, p in zip(missing, probes)]
            try:
                choice, note = gpu.plan(self.gpus, table)
            except UsageError:
                if strict:
                    raise
                choice = {e: None for e in missing}
                note = (f"nbparallel: engine(s) {_ranges(missing)} joined without the CUDA devices "
                        f"--gpus asked for; they run on the CPU.")
            if note:
                self.gpu_note = note
        futures = {e: self.client[e].apply_async(bind_gpu, choice[e]) for e in missing}
        for e, future in futures.items():
            info = future.get(timeout=ENGINE_TIMEOUT)
            info["visible"] = visible.get(e, [])
            self._info[e] = info

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
                                   info.get("device", "?"), False, alive=False))
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
            rows.append(EngineInfo(eid, info.get("host", "?"), info.get("pid", -1), device,
                                   bool(q.get("queue", 0) or q.get("tasks", 0)), uuid, used,
                                   total))
        return sorted(rows, key=lambda row: row.id)

    def check_controller(self, force: bool = False) -> None:
        """Raise :class:`ControllerLost` if the cluster's controller has gone.

        Cheap enough for every wait loop: it looks at most once a second unless ``force``.
        """
        reason = self._controller.check(force)
        if reason is None:
            return
        if self.how == "started":
            way = (f"`%nbp restart` (nbparallel.restart()) clears what is left of it and starts "
                   f"a fresh local cluster of {self.started_with.get('n', len(self._info))} engines")
        else:
            flags = _flags(self.connected_with.get("profile"), self.connected_with.get("cluster_id"))
            way = (f"start the cluster again where it runs (`ipcluster start -n "
                   f"{len(self._info)}{flags}`), then run `%nbp connect{flags}`")
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
        available = self.ids
        if not available:
            raise PoolError("the pool has no engines; start some with `%nbp start`.")
        if spec is None:
            return available
        wanted = parse_engines(spec) if isinstance(spec, str) else list(spec)
        unknown = [i for i in wanted if i not in available]
        if unknown:
            raise UsageError(
                f"--engines names engine(s) {', '.join(map(str, unknown))}, which the pool does "
                f"not have; available: {_ranges(available)}."
            )
        if not wanted:
            raise UsageError("--engines selected no engines.")
        return wanted

    # -- work ----------------------------------------------------------------------------------
    def apply(self, engine: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on one engine; returns a future (an ipyparallel AsyncResult)."""
        self.check_controller()
        try:
            view = self.client[engine]
        except IndexError:  # it died after the engines for this call were chosen
            raise PoolError(
                f"engine {engine} has stopped (the controller no longer lists it), so the work "
                f"for it was not sent. `%nbp status` shows the engines left; run the cell again."
            ) from None
        return view.apply_async(fn, *args)

    def balanced(self, fn: Callable[..., Any], *args: Any, engines: Sequence[int],
                 retries: int = 0) -> Any:
        """Run ``fn(*args)`` on whichever of ``engines`` is free first; returns a future."""
        self.check_controller()
        alive = self.alive(engines)
        if not alive:
            raise PoolError(
                f"every engine this work was sent to ({_ranges(engines)}) has stopped. "
                f"`%nbp status` shows the engines left; `%nbp start` starts a fresh pool."
            )
        view = self.client.load_balanced_view(alive)
        with view.temp_flags(retries=retries):
            return view.apply_async(fn, *args)

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

    def failure(self, exc: BaseException, engine: int | None, **where: Any) -> RemoteFailure:
        """Describe a future's exception: an engine that died, or an error outside the cell."""
        import ipyparallel as ipp

        # A dead engine arrives as EngineError, or as a RemoteError that wraps one.
        if isinstance(exc, ipp.error.EngineError) or getattr(exc, "ename", "") == "EngineError":
            return RemoteFailure(engine if engine is not None else -1, "EngineDied",
                                 f"the engine stopped while running this work ({exc})",
                                 "The engine process exited (killed, crashed or out of memory). "
                                 "`%nbp status` shows the engines still alive.\n", **where)
        if isinstance(exc, ipp.error.RemoteError):
            info = getattr(exc, "engine_info", None) or {}
            eid = info.get("engine_id", engine if engine is not None else -1)
            return RemoteFailure(eid, exc.ename, exc.evalue, exc.render_traceback() and
                                 "\n".join(exc.render_traceback()), **where)
        return RemoteFailure(engine if engine is not None else -1, type(exc).__name__, str(exc),
                             "", **where)

    def published(self, future: Any) -> dict[str, Any]:
        """What the task behind ``future`` published so far (``engine/live.py``), by key."""
        try:
            return dict(future.data)  # the client's IO thread merges new keys into this dict
        except Exception:
            return {}

    def relay_output(self, future: Any, engine: int) -> None:
        """Print what an engine printed while running ``future``, each line labelled by engine."""
        try:
            future.wait_for_output(timeout=2)
        except Exception:
            pass  # output that never arrives is not worth failing a cell for
        for text, stream in ((future.stdout, sys.stdout), (future.stderr, sys.stderr)):
            text = _text(text)
            if text:
                lines = text.rstrip("\n").split("\n")
                stream.write("".join(f"[engine {engine}] {line}\n" for line in lines))

    def __repr__(self) -> str:
        return f"<nbparallel.Pool {self.how}, engines {_ranges(self.ids) or 'none'}>"


def _controller_pids(cluster: Any) -> list[int]:
    """The started controller's pid, then those of the scheduler processes it forked."""
    import psutil

    pid = getattr(getattr(cluster, "controller", None), "pid", -1) or -1
    if pid <= 0:
        return []
    try:
        return [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def _ranges(ids: Sequence[int]) -> str:
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def _flags(profile: str | None, cluster_id: str | None) -> str:
    return (f" --profile={profile}" if profile else "") + (
        f" --cluster-id={cluster_id}" if cluster_id else "")


def _connection_file(profile: str | None, cluster_id: str | None) -> Path:
    from IPython.paths import get_ipython_dir

    profile_dir = Path(get_ipython_dir()) / f"profile_{profile or 'default'}"
    name = f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json"
    return profile_dir / "security" / name


# -- the current pool ------------------------------------------------------------------------
# One pool per kernel, like matplotlib's current figure: magics and the Python API share it.
_current: Pool | None = None


def current() -> Pool | None:
    """The pool magics use now, or None."""
    return _current


def start(n: int | None = None, *, say: Callable[[str], None] = print, **kwargs: Any) -> Pool:
    """Start an embedded local cluster and make it current (stops a previous one we started).

    ``gpus="all"|"none"|[0, 1]`` binds the engines to GPUs (see :meth:`Pool.start`); a note about
    the binding worth knowing (``"all"`` found no device) goes to ``say``.
    """
    global _current
    pool = Pool.start(n, **kwargs)
    stop()
    _current = pool
    if pool.gpu_note:
        say(pool.gpu_note)
    return pool


def connect(profile: str | None = None, cluster_id: str | None = None, *,
            say: Callable[[str], None] = print, **kwargs: Any) -> Pool:
    """Connect to a running ``ipcluster`` and make it current (``gpus=`` as for :func:`start`)."""
    global _current
    pool = Pool.connect(profile, cluster_id, **kwargs)
    stop()
    _current = pool
    if pool.gpu_note:
        say(pool.gpu_note)
    return pool


def restart(say: Callable[[str], None] = print) -> Pool:
    """Stop the current pool and start a fresh one as it was started (engines that died are back).

    Only for a pool nbparallel started: a cluster from ``ipcluster`` is restarted there, then
    ``%nbp connect`` reconnects.
    """
    old = _current
    if old is None or old.how != "started":
        raise UsageError(
            "%nbp restart restarts a pool nbparallel started, and "
            + ("there is none; `%nbp start` starts one." if old is None else
               "this one is a cluster it connected to: restart its engines where it runs "
               "(`ipcluster start`), then `%nbp connect`.")
        )
    kwargs = dict(old.started_with)
    n = kwargs.pop("n", None) or len(old.ids)
    stop()  # first: the new engines must not find the old ones' memory or cores taken
    return start(n, say=say, **kwargs)


def stop() -> None:
    """Stop (or disconnect from) the current pool."""
    global _current
    pool, _current = _current, None
    if pool is not None:
        pool.stop()


def ensure(say: Callable[[str], None] = print) -> Pool:
    """The current pool; without one, connect to a running default cluster or start a local one."""
    global _current
    if _current is not None and _current.ids:
        return _current
    if _connection_file(None, None).exists():
        try:
            _current = Pool.connect(timeout=2.0)
            say(f"nbparallel: connected to the running default cluster ({len(_current.ids)} "
                f"engines).")
            return _current
        except PoolError:
            pass  # a stale file from a cluster that has gone: start our own instead
    t0 = time.perf_counter()
    _current = Pool.start()
    say(f"nbparallel: started a local cluster of {len(_current.ids)} engines in "
        f"{time.perf_counter() - t0:.1f} s (`%nbp stop` stops it).")
    return _current

