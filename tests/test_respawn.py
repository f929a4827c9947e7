"""Engines that come back: a started pool replaces a killed engine in its rank before the next
magic, re-runs the stages it held, says which kept rows were lost, and a checkpointed training
run goes on from its last checkpoint, ending as if nothing had happened."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import nbparallel
from nbparallel import pipeline, respawn
from nbparallel import session as session_mod
from nbparallel.errors import PoolError, RemoteError

from test_model_parallel import LAYERS, assert_equal_layers, data, model, reference, trained

pytestmark = pytest.mark.cluster


@pytest.fixture
def healing(monkeypatch):
    """A pool of 3 engines of its own that replaces dead ones, current while the test runs."""
    s = nbparallel.Session(nbparallel.Pool.start(3))
    monkeypatch.setattr(session_mod, "_current", s)
    try:
        yield s
    finally:
        s.stop()


def kill(session, engine: int) -> int:
    """SIGKILL ``engine`` and wait until the controller has noticed; its pid."""
    pid = session.info(engine)["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while engine in session.pool.client.ids:
        assert time.monotonic() < deadline, f"engine {engine} is still registered"
        time.sleep(0.1)
    return pid


def test_a_killed_engine_is_replaced_in_its_rank_before_the_next_magic(healing, ip, capsys):
    assert healing.ids == [0, 1, 2]
    kill(healing, 1)
    ip.user_ns.update(a=np.arange(9), np=np)
    ip.run_cell_magic("scatter", "a --gather r", "r = np.full(len(a), rank)")
    out = capsys.readouterr().out
    assert "replaced engine 1 by engine 3 (same rank)" in out
    assert healing.ids == [0, 3, 2]  # engine 3 is rank 1
    np.testing.assert_array_equal(ip.user_ns["r"], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # The controller's queue counts may lag the replies by a moment: ask again until the new
    # engine reads idle (bounded), as a user running `%nbp status` twice would see.
    deadline = time.monotonic() + 10
    while True:
        ip.run_line_magic("nbp", "status")
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
        if "idle" in rows["3"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "dead, replaced by 3" in rows["1"] and "idle" in rows["3"]
    # Nothing died since: no engine starts, and the check costs next to nothing.
    t0 = time.perf_counter()
    assert healing.heal() == {}
    assert time.perf_counter() - t0 < 0.01


def test_without_respawn_a_dead_engine_stays_dead(monkeypatch):
    s = nbparallel.Session(nbparallel.Pool.start(2, respawn=False))
    try:
        kill(s, 1)
        assert s.heal() == {} and s.ids == [0]
        assert nbparallel.scatter("y = x * 2", {"x": np.arange(4)}, gather=["y"],
                                  pool=s)["y"].tolist() == [0, 2, 4, 6]
    finally:
        s.stop()


def test_a_replaced_engine_runs_its_stage_again(healing, capsys):
    pipeline.stage("a", "def forward(x, ctx):\n    return x + 1", engine=0, namespace={},
                   pool=healing)
    pipeline.stage("b", "k = 10\ndef forward(x, ctx):\n    return x * k", engine=2,
                   namespace={}, pool=healing)
    kill(healing, 2)
    y = pipeline.run(np.ones((4, 2)), microbatches=2, pool=healing)
    out = capsys.readouterr().out
    assert "replaced engine 2 by engine 3" in out
    assert "stage `b` ran its cell again" in out
    np.testing.assert_array_equal(y, np.full((4, 2), 20.0))
    assert healing.pipeline.stages["b"].engines == (3,)


def test_a_stage_whose_engine_died_takes_a_replicas_arrays(healing, capsys):
    """After data-parallel training the replicas hold the same trained weights: the stage on
    the replacement takes them instead of starting over."""
    params = model()
    x, t = data()
    healing.pipeline.clear()
    ns = {"np": np, "init": params, "N": 32, "lr": 0.1, "acts": [True, True, True, False]}
    pipeline.stage("s0", LAYERS, engine=0, namespace=ns, pool=healing)
    pipeline.train(x, t, microbatches=2, steps=3, data_parallel=2, pool=healing)
    want, _ = reference(params, x, t, 3)
    kill(healing, 0)
    assert healing.heal() == {0: 3}
    assert "took replica 1's arrays" in capsys.readouterr().out
    assert_equal_layers(trained(healing, [1]), want)


def test_kept_rows_on_a_dead_engine_are_reported_lost(healing):
    got = nbparallel.scatter("y = x * 2", {"x": np.arange(9.0)}, keep=["y"], pool=healing)
    y = got["y"]
    kill(healing, 1)
    healing.heal()
    assert [(r["engine"], r["rows"]) for r in y.lost] == [(1, (3, 6))]
    assert "lost with engine(s) 1" in repr(y)
    with pytest.raises(PoolError, match=r"part of `y` is lost: rows 3-5 on engine 1"):
        np.asarray(y)


def test_a_checkpointed_run_goes_on_after_an_engine_dies(healing, tmp_path, capsys):
    """6 steps, a checkpoint every 2; the engine of the second stage is killed during step 3.
    The run replaces it, goes back to step 2's checkpoint and ends equal to one process."""
    params = model()
    x, t = data()
    marker = tmp_path / "step3"
    healing.pipeline.clear()
    for s, (lo, hi), engine in ((0, (0, 2), 0), (1, (2, 4), 1)):
        ns = {"np": np, "init": params[lo:hi], "N": 32, "lr": 0.1,
              "acts": [k < 3 for k in range(lo, hi)], "marker": str(marker)}
        cell = LAYERS + ("\nimport pathlib, time\ndone = [0]\n_step = step\n"
                         "def step():\n    _step()\n    done[0] += 1\n"
                         "    if done[0] == 3 and not pathlib.Path(marker).exists():\n"
                         "        pathlib.Path(marker).touch()\n"
                         "        time.sleep(30)\n" if s == 1 else "")
        pipeline.stage(f"s{s}", cell, engine=engine, namespace=ns, pool=healing)
    pid = healing.info(1)["pid"]

    def watch() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    losses = pipeline.train(x, t, microbatches=2, steps=6, pool=healing, checkpoint_every=2,
                            checkpoint_dir=str(tmp_path / "ckpt"))
    out = capsys.readouterr().out
    assert "replaced engine 1 by engine 3" in out
    assert "went back to the checkpoint of step 2" in out
    want, want_losses = reference(params, x, t, 6)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    assert_equal_layers(trained(healing, [2, 2]), want)
    kept = sorted(p.name.split("-")[1] for p in (tmp_path / "ckpt").glob("step-*"))
    assert kept == ["000004", "000006"]  # the last two


def test_an_engine_that_keeps_dying_is_given_up_on(healing, monkeypatch, capsys):
    monkeypatch.setattr(respawn, "MAX_REPLACEMENTS", 1)
    kill(healing, 2)
    assert healing.heal() == {2: 3}
    kill(healing, 3)
    assert healing.heal() == {}
    assert "died 2 times in 300 s, so it is not replaced again" in capsys.readouterr().out
    assert healing.ids == [0, 1]
    with pytest.raises(RemoteError):  # the pool goes on: a failing cell still reports normally
        nbparallel.scatter("raise ValueError('x')", {"x": np.arange(4)}, pool=healing)
