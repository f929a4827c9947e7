"""What a cluster started with ``ipcluster`` says about itself, read from its files.

``ipcluster start`` writes two files into its profile's ``security`` folder: the client
connection file (``ipcontroller[-<id>]-client.json``: where the controller listens) and the
cluster file (``cluster-<id>.json``: its launchers, how many engines each set was asked for,
and a batch job's id). Connecting reads them to tell a user what it found when engines are
missing: a controller that is not running, engines still to come, a job still in its
scheduler's queue. Nothing here talks to the cluster beyond one TCP probe of its controller.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .controller import PROBE_TIMEOUT, address_of, connection_file, is_profile_dir
from .errors import PoolError

__all__ = ["Launched", "launched", "controller_down", "profiles", "job_states", "QUERY_TIMEOUT",
           "no_engines_advice", "no_cluster_advice", "await_engines"]

WAIT_SAY_EVERY = 10.0  # seconds between progress lines while --wait waits for nothing new
#: Batch systems whose job state we can ask for, by ipyparallel's launcher class name.
_QUERIES = {"slurm": ["squeue", "--noheader", "--format=%T", "--jobs"]}


@dataclass(frozen=True)
class Launched:
    """What the cluster file says was launched: ``engines`` asked for (None when unknown) and
    the batch jobs that run them as ``(scheduler, job id)``."""

    engines: int | None = None
    jobs: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def launched(profile: str | None, cluster_id: str | None) -> Launched:
    """What ``ipcluster`` launched for the cluster so named (nothing known: empty)."""
    path = connection_file(profile, cluster_id).with_name(f"cluster-{cluster_id or ''}.json")
    try:
        engines = json.loads(path.read_text()).get("engines") or {}
    except (OSError, ValueError, AttributeError):
        return Launched()
    kind = str(engines.get("class", "")).lower()
    scheduler = next((name for name in _QUERIES if name in kind), "")
    total, jobs = 0, []
    for spec in (engines.get("sets") or {}).values():
        if not isinstance(spec, dict):
            continue
        total += int(spec.get("n") or 0)
        if spec.get("job_id"):
            jobs.append((scheduler or kind or "batch", str(spec["job_id"])))
    return Launched(total or None, tuple(jobs))


#: Seconds a scheduler's query tool (squeue) may take before the state is left unknown: a
#: connect without --wait must answer within seconds, and a wait's progress line too.
QUERY_TIMEOUT = 2.0


def job_states(jobs: tuple[tuple[str, str], ...]) -> str:
    """``"Slurm job 12: PENDING"`` for each job whose scheduler we can ask (at most
    :data:`QUERY_TIMEOUT` s); the job id alone, or what the scheduler's tool said went wrong,
    for the others; empty for none."""
    said = []
    for scheduler, job in jobs:
        query = _QUERIES.get(scheduler)
        state = ""
        if query and shutil.which(query[0]):
            try:
                out = subprocess.run([*query, job], capture_output=True, text=True,
                                     timeout=QUERY_TIMEOUT)
            except subprocess.TimeoutExpired:
                state = f"{query[0]} did not answer within {QUERY_TIMEOUT:g} s"
            except (OSError, subprocess.SubprocessError):
                state = ""
            else:
                # Empty output is a job that left the queue only when the tool succeeded: a
                # squeue without its slurm.conf fails with nothing on stdout too.
                if out.returncode != 0:
                    why = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
                    state = f"state unknown, {query[0]} failed: {why}"
                elif out.stdout.strip():
                    state = out.stdout.strip().splitlines()[0]
                else:
                    state = "no longer queued"
        name = scheduler.capitalize() if scheduler in _QUERIES else scheduler
        said.append(f"{name} job {job}" + (f": {state}" if state else ""))
    return "; ".join(said)


def controller_down(url_file: Path) -> str | None:
    """Why the controller in ``url_file`` cannot be running (nothing listens at its
    registration address), or None when it answers or cannot be probed from here."""
    try:
        info = json.loads(url_file.read_text())
    except (OSError, ValueError):
        return f"{url_file} cannot be read"
    interface = str(info.get("interface", ""))
    port = info.get("registration")
    if info.get("ssh") or not port:
        return None
    url = f"{interface}:{port}"
    address = address_of(url)
    if address is None:
        return None
    try:
        socket.create_connection(address, timeout=PROBE_TIMEOUT).close()
    except ConnectionRefusedError:
        return f"nothing listens at {url}, where {url_file.name} says its controller is"
    except OSError:
        return None  # slow or filtered: let the client try
    return None


def profiles() -> list[str]:
    """The IPython profiles that exist, by name."""
    from IPython.paths import get_ipython_dir

    return sorted(p.name.removeprefix("profile_") for p in Path(get_ipython_dir()).glob("profile_*")
                  if p.is_dir())


def no_engines_advice(launched: Launched, named: str) -> str:
    """What to do about a running cluster without engines, given what was launched: wait for a
    queued job, read the logs of launched engines, or launch some (only when none were)."""
    wait = f"`%nbp connect --wait{named}` waits for them (10 minutes; `--wait 3600` for an hour)"
    if launched.jobs:
        return f"Its engines start when the job runs: {wait}."
    if launched.engines:
        return (f"ipcluster launched {launched.engines}; if none comes, their logs (ipengine-*.log "
                f"in the profile's log folder) say why. {wait[0].upper() + wait[1:]}.")
    return f"Start some with `ipcluster engines -n 4{named}`, then {wait}."


def no_cluster_advice(profile: str | None, named: str) -> str:
    """What to do when there is no connection file: name the profiles that exist when the one
    asked for does not, else say how to start a cluster."""
    known = profiles()
    if profile and not is_profile_dir(profile) and profile not in known:
        return (f"There is no IPython profile {profile!r} (the profiles here are: "
                f"{', '.join(known) or 'none'}); `ipcluster start -n 4{named}` makes it and starts "
                f"a cluster there.")
    return (f"Start one in a terminal with `ipcluster start -n 4{named}`, or use `%nbp start` "
            f"for a local one.")


def await_engines(count: Callable[[], int], url_file: Path, launched: Launched, named: str,
                  timeout: float, wait: float | None, n: int | None,
                  say: Callable[[str], None]) -> str | None:
    """Wait until ``count()`` engines reach ``n`` (default 1; with ``wait``, as many as were
    launched), at most ``timeout`` s or, with ``wait``, that long, telling ``say`` how many have
    come. Returns a note worth telling the user (fewer engines than launched or asked for);
    raises :class:`PoolError` when none came."""
    want = n or (launched.engines if wait is not None else None) or 1
    limit = timeout if wait is None else wait
    deadline = time.monotonic() + limit
    said, shown = 0.0, -1
    try:
        while (got := count()) < want and (left := deadline - time.monotonic()) > 0:
            if wait is not None and (got != shown or time.monotonic() - said >= WAIT_SAY_EVERY):
                jobs = job_states(launched.jobs)
                say(f"nbparallel: waiting for engines: {got} of {want} registered"
                    + (f" ({jobs})" if jobs else "") + f", {left:.0f} s left (Ctrl-C stops waiting).")
                said, shown = time.monotonic(), got
            time.sleep(min(0.2, left))
    except KeyboardInterrupt:
        raise PoolError(f"stopped waiting (Ctrl-C) with {count()} of {want} engines "
                        f"registered; `%nbp connect{named}` connects to those there are.") from None
    if got == 0:
        jobs = job_states(launched.jobs)
        raise PoolError(
            f"the cluster described by {url_file} is running (its controller answers) but no "
            f"engine registered within {limit:g} s"
            + (f" ({jobs})" if jobs else "") + ". " + no_engines_advice(launched, named)
        )
    if got < want:
        return (f"only {got} of the {want} engines asked for registered within {limit:g} s; "
                f"the others join the pool when they register.")
    if launched.engines and got < launched.engines:
        return (f"{got} of the {launched.engines} engines ipcluster launched have registered so "
                f"far; the others join the pool when they register (`%nbp connect --wait{named}` "
                f"waits for them).")
    return None
