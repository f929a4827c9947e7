"""Fuzzed magic lines (Hypothesis over option tokens), on the session's real engines.

Every line must end within a few seconds either in one of our errors (the ``NbparallelError``
tree: one paragraph, no internal traceback) or in a run that works; a line that fails leaves the
notebook's names exactly as they were. Tokens mix each magic's options with the values that once
hung or crashed: ranges of a million engines, 20-digit counts, unclosed quotes, NaN timeouts.
Commands that replace the pool (``%nbp start|stop|restart|connect``) are not fuzzed here.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbparallel import config
from nbparallel.errors import NbparallelError

pytestmark = pytest.mark.cluster

NASTY = ["0-1000000", "0-99999999999999999999", "99999999999999999999", "-1", "0", "1e400", "nan",
         "inf", '"c', "'", "\\", "=", ",", "-", "--", "--bogus", "7", "3-1", "0-"]
TOKENS = {
    "scatter": ["a", "b", "c", "--gather", "--reduce", "c=sum", "c=avg", "--broadcast", "--axis",
                "--halo", "2", "--keep", "--engines", "0-1", "--transport", "shm", "ipp",
                "--comm", "mpi", "direct", "--comm-timeout", "--no-dashboard"],
    "pmap": ["x", "in", "range(3)", "items", "nope", "->", "r", "--chunksize", "5", "--retries",
             "--unordered", "--engines", "0-1", "--transport", "direct", "--no-progress"],
    "stage": ["s0", "s1", "--engine", "1", "2x", "--bogus"],
    "pipeline": ["schedule", "run", "train", "show", "--stages", "2", "--microbatches", "3000000",
                 "100000", "--schedule", "1f1b", "interleaved", "zb-h1", "gpipe", "--virtual",
                 "--input", "xs", "--target", "ts", "--out", "y", "--steps", "4"],
    "nbp": ["status", "dashboard", "on", "off", "trace", "save", "/nonexistent/t.json", "-n",
            "--profile", "--gpus", "all", "none"],
}
CELLS = {"scatter": "c = a", "pmap": "x", "stage": "def forward(x, ctx):\n    return x"}
#: `%nbp` lines may not start with these: they would replace the session's pool.
POOL_COMMANDS = {"start", "stop", "restart", "connect", "monitor"}
SECONDS = 10.0


#: Starts of lines that work, so that half the fuzzed lines begin well and go wrong later.
GOOD = {"scatter": ["a --gather c"], "pmap": ["x in range(3) -> r"], "stage": ["s0"],
        "pipeline": ["schedule --stages 2 --microbatches 4", "show"], "nbp": ["status"]}


def lines(magic: str) -> st.SearchStrategy[str]:
    words = st.lists(st.sampled_from(TOKENS[magic] + NASTY), min_size=0, max_size=8).map(" ".join)
    good = st.tuples(st.sampled_from(GOOD[magic]), words).map(" ".join)
    return st.one_of(words, good)


def _run(ip, pool, magic: str, line: str) -> str:
    """Run one line; "worked", "refused" (our error) or "skipped"."""
    if magic == "nbp" and (line.split() or [""])[0] in POOL_COMMANDS:
        return "skipped"
    ip.user_ns.update(a=np.arange(12.0), b=np.arange(12.0), items=[1, 2, 3],
                      xs=np.ones((4, 2)), ts=np.zeros((4, 2)))
    before = {k: id(v) for k, v in ip.user_ns.items() if not k.startswith("_")}
    dashboard = config.dashboard
    t0 = time.perf_counter()
    try:
        if magic in CELLS:
            ip.run_cell_magic(magic, line, CELLS[magic])
        else:
            ip.run_line_magic(magic, line)
        failed = None
    except NbparallelError as exc:
        failed = exc
        text = str(exc)
        assert text.strip() and "Traceback (most recent call last)" not in text, text
    finally:
        config.dashboard = dashboard
        pool.pipeline.clear()
    took = time.perf_counter() - t0
    assert took < SECONDS, f"%{magic} {line!r} took {took:.1f} s"
    if failed is not None:
        after = {k: id(v) for k, v in ip.user_ns.items() if not k.startswith("_")}
        assert after == before, f"%{magic} {line!r} failed ({failed}) but changed names"
    return "worked" if failed is None else "refused"


FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("magic", sorted(TOKENS))
def test_fuzzed_lines_end_in_our_error_or_work(ip, pool, magic):
    seen: dict[str, int] = {}

    @FUZZ
    @given(line=lines(magic))
    def check(line):
        outcome = _run(ip, pool, magic, line)
        seen[outcome] = seen.get(outcome, 0) + 1

    check()
    # Not vacuous: some lines ran for real, and some were refused.
    assert seen.get("worked", 0) > 0 and seen.get("refused", 0) > 0, seen


@pytest.mark.parametrize("magic, line", [
    ("scatter", "a --gather c --engines 0-1000000"),
    ("scatter", "a --gather c --engines 0-99999999999999999999"),
    ("scatter", 'a --gather "c'),
    ("pipeline", "schedule --stages 2 --microbatches 3000000"),
    ("pipeline", "schedule --stages 100000 --microbatches 100000"),
    ("pipeline", "schedule --stages 99999999999999999999 --microbatches 2"),
    ("pipeline", "run --input xs --microbatches 99999999999999999999 --out y"),
])
def test_the_lines_that_once_hung_are_quick_errors(ip, pool, magic, line):
    pool.pipeline.clear()
    if magic == "pipeline" and line.startswith("run"):
        ip.run_cell_magic("stage", "s0 --engine 0", CELLS["stage"])
    try:
        with pytest.raises(NbparallelError):
            t0 = time.perf_counter()
            try:
                if magic in CELLS:
                    ip.user_ns.update(a=np.arange(12.0))
                    ip.run_cell_magic(magic, line, CELLS[magic])
                else:
                    ip.user_ns.update(xs=np.ones((4, 2)))
                    ip.run_line_magic(magic, line)
            finally:
                assert time.perf_counter() - t0 < 3.0
    finally:
        pool.pipeline.clear()
