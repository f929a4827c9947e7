"""What every group of ``nbparallel bench`` measures with: the trial and setup types, the
measuring loop and the result check, and the names and units the groups share.

A case is a :data:`Setup`: entering it (untimed) yields a :data:`Trial`, which runs the case once
and returns the seconds of each ``what`` it times. :func:`measure` runs one warm-up trial, which
also checks the result, then ``repeat`` timed ones, and turns them into the report's rows.
:mod:`nbparallel.bench` (the CPU groups, the ratios, the tables) and :mod:`nbparallel.benchgpu`
(the ``gpu`` group) both build on it; it imports neither.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["Trial", "Setup", "measure", "check", "one", "ready", "split"]

NB = "nbparallel"  #: the name of nbparallel's own rows, which the others are compared with
MB, GB = 10**6, 10**9  # decimal units, as GB/s is usually quoted
HOP = "activation hop"  #: the ``what`` of a pipeline stage handing activations to the next
HOP_MBS = 8  #: the micro-batches of an activation hop

Trial = Callable[[bool], "dict[str, float]"]  # trial(check) -> seconds per `what`
Setup = Callable[[], AbstractContextManager]  # yields a Trial; entering and leaving are not timed


def measure(group: str, name: str, whats: Sequence[str], setup: Setup | None, repeat: int,
            say: Callable[[str], None], *, nbytes: dict[str, int] | None = None,
            items: int | None = None) -> list[dict[str, Any]]:
    """One case: set up, warm up (and check), time ``repeat`` runs; one row per ``what``.

    ``setup`` None means the library is not installed."""
    say(f"bench: {group}: {name}: {', '.join(whats)}")
    runs: list[dict[str, float]] = []
    error = None if setup else "not installed"
    try:
        if setup:
            with setup() as trial:
                trial(True)  # pays imports, connections and first-touch page faults, untimed
                runs = [trial(False) for _ in range(repeat)]
    except Exception as exc:  # isolation: one broken case must not hide the others
        error, runs = f"error: {type(exc).__name__}: {exc}", []
    rows = []
    for what in whats:
        times = [r[what] for r in runs]
        best = min(times) if times else None
        row: dict[str, Any] = {"group": group, "name": name, "what": what, "seconds_best": best,
                               "seconds_median": statistics.median(times) if times else None,
                               "error": error}
        if nbytes is not None:
            row["gbps"] = nbytes[what] / best / GB if best else None
        if items is not None:
            row["items_per_s"] = items / best if best else None
        rows.append(row)
    return rows


def check(got: Any, want: Any) -> None:
    """Raise unless ``got`` equals ``want`` element for element: the benchmarked path is broken."""
    if not np.array_equal(np.asarray(got), np.asarray(want)):
        raise RuntimeError(f"the result differs from the input (got shape {np.shape(got)}, "
                           f"expected {np.shape(want)}): the benchmarked path is broken")


def one(what: str, fn: Callable[[], Any], want: Any = None) -> Trial:
    """A trial timing one call of ``fn``; the warm-up compares its result with ``want``."""
    def trial(check_it: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        got = fn()
        took = time.perf_counter() - t0
        if check_it and want is not None:
            check(got, want)
        return {what: took}
    return trial


def ready(trial: Trial) -> Setup:
    """The setup of a case that needs none."""
    return lambda: nullcontext(trial)


def split(first: Callable[[], Any], second: Callable[[Any], Any], after: Callable[[Any], Any],
          want: np.ndarray, verify: Callable[[Any], None] = lambda _sent: None) -> Trial:
    """A trial timing ``first()`` (scatter) then ``second(its result)`` (gather); ``after`` frees
    what ``first`` left behind, and the warm-up also runs ``verify(what first returned)``."""
    def trial(check_it: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        sent = first()
        t1 = time.perf_counter()
        try:
            back = second(sent)
            t2 = time.perf_counter()
            if check_it:
                check(back, want)
                verify(sent)
        finally:
            after(sent)
        return {"scatter": t1 - t0, "gather": t2 - t1, "round trip": t2 - t0}
    return trial
