"""Ctrl-C during a magic returns control quickly and stops the work on the engines."""

import os
import signal
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.cluster


def _interrupt_after(seconds: float) -> None:
    threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT)).start()


@pytest.mark.parametrize("magic, line, cell", [
    ("pmap", "x in range(6) -> r", "import time\ntime.sleep(30)\nx"),
    ("scatter", "a --gather r", "import time\ntime.sleep(30)\nr = a"),
])
def test_ctrl_c_returns_within_two_seconds_and_frees_the_engines(ip, magic, line, cell):
    ip.user_ns.update(a=np.arange(6), r="before")
    _interrupt_after(1.0)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic(magic, line, cell)
    assert time.perf_counter() - t0 < 1.0 + 2.0
    assert ip.user_ns["r"] == "before"
    # The engines stopped sleeping: new work finishes at once instead of after 30 s.
    t1 = time.perf_counter()
    ip.run_cell_magic("scatter", "a --gather r", "r = a + 1")
    assert time.perf_counter() - t1 < 5.0
    np.testing.assert_array_equal(ip.user_ns["r"], np.arange(1, 7))


@pytest.mark.parametrize("magic, line, cell", [
    ("pmap", "x in items -> r", "import time\ntime.sleep(30)\nx"),
    ("scatter", "big --gather r", "import time\ntime.sleep(30)\nr = big"),
])
def test_ctrl_c_with_shared_memory_payloads_leases_nothing(ip, pool, magic, line, cell):
    big = np.ones((6, 100_000))  # 4.8 MB: through shared memory
    ip.user_ns.update(big=big, items=list(big), r="before")
    _interrupt_after(1.0)
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic(magic, line, cell)
    assert ip.user_ns["r"] == "before"
    assert pool.plane.arena.leased() == []
    ip.run_cell_magic("scatter", "big --gather r", "r = big + 1")
    np.testing.assert_array_equal(ip.user_ns["r"], big + 1)


def test_ctrl_c_during_a_pipeline_run_stops_every_stage(ip, pool):
    pool.pipeline.clear()
    ip.user_ns.update(x=np.zeros((4, 2)), y="before")
    ip.run_cell_magic("stage", "s0 --engine 0", "def forward(x, ctx):\n    return x + 1")
    ip.run_cell_magic("stage", "s1 --engine 1",
                      "import time\ndef forward(x, ctx):\n    time.sleep(30)\n    return x")
    _interrupt_after(1.0)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("pipeline", "run --input x --microbatches 4 --out y")
    assert time.perf_counter() - t0 < 1.0 + 2.0
    assert ip.user_ns["y"] == "before"
    ip.run_cell_magic("stage", "s1 --engine 1", "def forward(x, ctx):\n    return x * 2")
    t1 = time.perf_counter()
    ip.run_line_magic("pipeline", "run --input x --microbatches 4 --out y")
    assert time.perf_counter() - t1 < 5.0
    np.testing.assert_array_equal(ip.user_ns["y"], np.full((4, 2), 2.0))
    assert pool.plane.arena.leased() == []
    pool.pipeline.clear()


def test_ctrl_c_during_pipeline_training_stops_every_stage(ip, pool):
    pool.pipeline.clear()
    ip.user_ns.update(x=np.zeros((4, 2)), losses="before")
    quick = ("def forward(x, ctx):\n    return x\n"
             "def backward(grad, ctx):\n    return grad\n")
    ip.run_cell_magic("stage", "s0 --engine 0", quick)
    ip.run_cell_magic("stage", "s1 --engine 1",
                      "import time\ndef forward(x, ctx):\n    return x\n"
                      "def loss(y, t):\n    return 0.0, y\n"
                      "def backward(grad, ctx):\n    time.sleep(30)\n    return grad\n")
    _interrupt_after(1.0)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("pipeline", "train --input x --target x --microbatches 4 "
                                      "--schedule 1f1b --out losses")
    assert time.perf_counter() - t0 < 1.0 + 2.0
    assert ip.user_ns["losses"] == "before"
    ip.run_cell_magic("stage", "s1 --engine 1", quick + "def loss(y, t):\n    return 1.0, y\n")
    t1 = time.perf_counter()
    ip.run_line_magic("pipeline", "train --input x --target x --microbatches 4 --out losses")
    assert time.perf_counter() - t1 < 5.0
    assert ip.user_ns["losses"] == [4.0]
    assert pool.plane.arena.leased() == []
    pool.pipeline.clear()
