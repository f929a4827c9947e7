"""A thousand magics in a row: nothing of the notebook process grows.

The cells are what a long interactive session is made of: tiny ``%%scatter`` and ``%%pmap``
cells (their values ride inside ipyparallel's messages), and every 50th a ``%%scatter`` of an
array large enough to go through shared memory both ways. After a warm-up of 50 cells (sockets,
warm segments, imports), the notebook's open file descriptors, its ``/dev/shm`` segments and its
resident memory are measured; after 1000 more cells they must be where they were:

* file descriptors: at most 2 more (ZeroMQ reopening a socket after a timeout would be one);
* segments: at most 1 more (a warm segment of another size);
* resident memory: at most 16 MiB more. Measured on the 2-core machine: +4.9 MiB over the 1000
  cells (and about 5 to 8 MiB per 1000 more). tracemalloc shows what holds it, all of it bounded
  or tiny: the monitor's and the data plane's telemetry rings (about 1 MiB per 1000 cells, capped
  at 100,000 spans and 10,000 transfers and samples: 16.9 MiB full, README), jupyter_client's
  set of the signatures of received messages, its replay protection (about 1 MiB per 1000 cells,
  capped at 65,536 signatures), ipyparallel's ``client.history`` of message ids (about 0.3 MiB
  per 1000 cells, never trimmed by ipyparallel), and the allocator's slack. Keeping one 4.8 MB
  array per shared-memory cell would add 96 MB, 16 KB per cell 16 MB: either fails.

ipyparallel keeps every task's result in ``client.results`` unless the AsyncResult owns it; the
check on it below would catch a magic that makes results pile up (a %%pmap of large items would
keep them all alive).

Measured (fds, segments, RSS): 38 -> 38, 2 -> 2, 84.0 -> 88.9 MiB, 1000 cells in 19.5 s.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.cluster

WARM_UP = 50
CELLS = 1000
EVERY = 50  # one shared-memory cell in this many
MAX_NEW_FDS = 2
MAX_NEW_SEGMENTS = 1
MAX_RSS_GROWTH = 16 << 20

BIG = np.arange(6 * 100_000, dtype=np.float64).reshape(6, 100_000)  # 4.8 MB


def segments() -> int:
    return sum(1 for _ in Path("/dev/shm").glob(f"nbp-{os.getpid()}-*"))


def measure() -> dict[str, int]:
    gc.collect()
    me = psutil.Process()
    return {"fds": me.num_fds(), "segments": segments(), "rss": me.memory_info().rss}


def cell(ip, i: int) -> None:
    if i % EVERY == 0:
        ip.run_cell_magic("scatter", "big --gather y --reduce s=sum --no-dashboard",
                          "y = big + 1\ns = float(big.sum())")
        assert ip.user_ns["y"][5, 99_999] == BIG[5, 99_999] + 1
        assert ip.user_ns["s"] == pytest.approx(float(BIG.sum()))
    elif i % 2:
        ip.run_cell_magic("scatter", "small --gather y --reduce s=sum --no-dashboard",
                          "y = small * 2\ns = int(small.sum())")
        assert ip.user_ns["s"] == 15
    else:
        ip.run_cell_magic("pmap", "v in range(i % 7 + 1) -> r --no-progress --no-dashboard",
                          "v * k")
        assert ip.user_ns["r"] == [v * 3 for v in range(i % 7 + 1)]


def test_a_thousand_magics_leak_no_descriptor_segment_or_memory(ip, pool):
    ip.user_ns.update(big=BIG, small=np.arange(6), k=3)
    for i in range(WARM_UP):
        ip.user_ns["i"] = i
        cell(ip, i)
    before = measure()
    history = len(pool.pool.client.history)
    t0 = time.perf_counter()
    for i in range(CELLS):
        ip.user_ns["i"] = i
        cell(ip, i)
    seconds = time.perf_counter() - t0
    after = measure()
    report = (f"{CELLS} cells in {seconds:.1f} s: fds {before['fds']} -> {after['fds']}, "
              f"segments {before['segments']} -> {after['segments']}, RSS "
              f"{before['rss'] / 2**20:.1f} -> {after['rss'] / 2**20:.1f} MiB")
    print(report)
    assert after["fds"] <= before["fds"] + MAX_NEW_FDS, report
    assert after["segments"] <= before["segments"] + MAX_NEW_SEGMENTS, report
    assert after["rss"] - before["rss"] <= MAX_RSS_GROWTH, report
    assert pool.plane.arena.leased() == []
    # ipyparallel keeps every task's result until asked not to: the magics must not pile them up.
    assert len(pool.pool.client.results) <= 100, len(pool.pool.client.results)
    assert len(pool.pool.client.history) - history >= CELLS  # the cells did reach the engines
