"""Pipeline stages on real engines: training equals one process, for every schedule."""

from __future__ import annotations

import numpy as np
import pytest

import nbparallel
from nbparallel import pipeline
from nbparallel.errors import RemoteError, UsageError

pytestmark = pytest.mark.cluster

STAGE = """
W = W_init.copy()
b = b_init.copy()
gW = np.zeros_like(W)
gb = np.zeros_like(b)

def forward(x, ctx):
    z = x @ W + b
    y = np.tanh(z) if act else z
    ctx["x"], ctx["y"] = x, y
    return y

def backward_input(grad, ctx):
    g = grad * (1 - ctx["y"] ** 2) if act else grad
    ctx["g"] = g
    return g @ W.T

def backward_weight(ctx):
    gW[...] += ctx["x"].T @ ctx["g"]
    gb[...] += ctx["g"].sum(axis=0)

def backward(grad, ctx):
    gin = backward_input(grad, ctx)
    backward_weight(ctx)
    return gin

def loss(y, t):
    d = y - t
    return 0.5 * float((d * d).sum()) / N, d / N

def step():
    W[...] -= lr * gW
    b[...] -= lr * gb
    gW[...] = 0
    gb[...] = 0
"""

SIZES = [6, 16, 16, 16, 3]
N, LR = 32, 0.1


def model(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((i, o)) / np.sqrt(i), rng.standard_normal(o) * 0.1)
            for i, o in zip(SIZES, SIZES[1:])]


def reference(params, x, t, steps):
    """The unsplit model, one process, full batch."""
    params = [(W.copy(), b.copy()) for W, b in params]
    losses = []
    for _ in range(steps):
        acts, h = [x], x
        for k, (W, b) in enumerate(params):
            h = h @ W + b
            h = np.tanh(h) if k < len(params) - 1 else h
            acts.append(h)
        d = h - t
        losses.append(0.5 * float((d * d).sum()) / N)
        g = d / N
        grads = []
        for k in reversed(range(len(params))):
            W, b = params[k]
            if k < len(params) - 1:
                g = g * (1 - acts[k + 1] ** 2)
            grads.append((acts[k].T @ g, g.sum(axis=0)))
            g = g @ W.T
        for (W, b), (gW, gb) in zip(params, reversed(grads)):
            W -= LR * gW
            b -= LR * gb
    return params, losses


def define(pool, params, engines):
    """One linear layer per stage; len(engines) stages in order."""
    pool.pipeline.clear()
    for k, ((W, b), eid) in enumerate(zip(params, engines)):
        ns = {"np": np, "W_init": W, "b_init": b, "act": k < len(params) - 1, "N": N, "lr": LR}
        pipeline.stage(f"s{k}", STAGE, engine=eid, namespace=ns, pool=pool)


def weights(pool):
    return [(pool.pipeline.pull(info.name, "W"), pool.pipeline.pull(info.name, "b"))
            for info in pipeline.show(pool=pool)]


def assert_like_one_process(pool, params, x, t, losses, steps):
    """The losses, and every stage's weights and biases, equal one process's training."""
    want, want_losses = reference(params, x, t, steps)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    for (W, b), (W2, b2) in zip(weights(pool), want):
        np.testing.assert_allclose(W, W2, rtol=1e-6)
        np.testing.assert_allclose(b, b2, rtol=1e-6)


@pytest.fixture(scope="module")
def pool4():
    p = nbparallel.Session(nbparallel.Pool.start(4))
    yield p
    p.stop()


def data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((N, SIZES[0])), rng.standard_normal((N, SIZES[-1]))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_four_stages_train_like_one_process(pool4, schedule):
    params = model()
    x, t = data()
    define(pool4, params, pool4.ids)
    losses = pipeline.train(x, t, 8, schedule=schedule, steps=3, pool=pool4)
    assert_like_one_process(pool4, params, x, t, losses, 3)
    result = pool4.pipeline.last[-1]
    assert len(result.spans) == len(result.schedule.ranks[0]) * 4
    assert 0 <= result.bubble < 1


def test_four_stages_on_two_engines_train_interleaved(pool, pool4):
    params = model()
    x, t = data()
    define(pool, params, [0, 1, 0, 1])
    losses = pipeline.train(x, t, 4, schedule="interleaved", steps=2, pool=pool)
    assert_like_one_process(pool, params, x, t, losses, 2)


@pytest.mark.parametrize("schedule, engines, m", [
    ("interleaved-zb", [0, 1, 0, 1], 4),
    ("zb-v", [0, 1, 1, 0], 4),
    ("zb-v", [0, 1, 1, 0], 2),  # fewer micro-batches than the 2p - 1 ZB-V is built for
    ("interleaved", [0, 1, 0, 1], 3),  # not a multiple of p: one round of 3, as PyTorch runs it
])
def test_zero_bubble_and_v_schedules_train_like_one_process(pool, schedule, engines, m):
    params = model()
    x, t = data()
    define(pool, params, engines)
    losses = pipeline.train(x, t, m, schedule=schedule, steps=2, pool=pool)
    assert_like_one_process(pool, params, x, t, losses, 2)
    result = pool.pipeline.last[-1]
    assert result.schedule.name == schedule and {sp[0] for sp in result.spans} == {0, 1}
    if schedule == "zb-v":  # the V runs forward too: stage 3 on engine 0, after stage 2 on 1
        trained = weights(pool)
        h = x
        for k, (W, b) in enumerate(trained):
            h = h @ W + b
            h = np.tanh(h) if k < len(trained) - 1 else h
        np.testing.assert_allclose(pipeline.run(x, 3, pool=pool), h, rtol=1e-9)


def test_zb_v_needs_its_stages_in_a_v_and_the_interleaved_ones_round_robin(pool):
    params = model()
    x, t = data()
    define(pool, params, [0, 1, 0, 1])
    with pytest.raises(UsageError, match=r"--schedule zb-v needs them in a V: stage s on engine "
                       r"\[0, 1, 1, 0\]\[s\]"):
        pipeline.train(x, t, 4, schedule="zb-v", pool=pool)
    define(pool, params, [0, 1, 1, 0])
    with pytest.raises(UsageError, match="form a V, which only --schedule zb-v runs"):
        pipeline.train(x, t, 4, schedule="interleaved", pool=pool)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stages_train_and_run(pool, schedule):
    params = model()
    merged = params[:2]
    x, t = data()
    define(pool, merged, [0, 1])
    y = pipeline.run(x, 5, pool=pool)
    h = np.tanh(x @ merged[0][0] + merged[0][1]) @ merged[1][0] + merged[1][1]
    # The last stage here has act=True only for k < 1: stage 1 is linear.
    np.testing.assert_allclose(y, h, rtol=1e-9)
    cursor = pool.transfers.cursor
    pipeline.train(x, h + 0.5, 4, schedule=schedule, steps=1, pool=pool)
    stage_bytes = [r for r in pool.transfers.since(cursor)[0] if r.kind == "stage"]
    assert sum(r.nbytes for r in stage_bytes) > 0


def test_bad_pipeline_input(pool):
    params = model()[:2]
    x, t = data()
    define(pool, params, [0, 1])
    with pytest.raises(UsageError, match="fewer than --microbatches"):
        pipeline.run(x[:3], 4, pool=pool)
    with pytest.raises(UsageError, match="interleaved"):
        define(pool, model(), [0, 1, 0, 1])
        pipeline.train(x, t, 4, schedule="1f1b", pool=pool)
    pool.pipeline.clear()
    with pytest.raises(UsageError, match="does not define forward"):
        pipeline.stage("bad", "W = 1", engine=0, pool=pool)
    with pytest.raises(UsageError, match="lacks backward"):
        pipeline.stage("fwd", "def forward(x, ctx):\n    return x", engine=0, pool=pool)
        pipeline.train(x, t, 2, pool=pool)
    with pytest.raises(UsageError, match="no stages"):
        pool.pipeline.clear()
        pipeline.run(x, 2, pool=pool)


def test_an_exception_in_a_stage_names_it_and_the_engines_stay_usable(pool):
    params = model()[:2]
    x, t = data()
    define(pool, params, [0, 1])
    ns = {"np": np}
    pipeline.stage("s1", "def forward(x, ctx):\n    if len(x) < 8:\n        raise ValueError('tiny')\n"
                   "    return x", engine=1, namespace=ns, pool=pool)
    with pytest.raises(RemoteError) as info:
        pipeline.run(x[:30], 4, pool=pool)  # micro-batches of 8, 8, 7, 7
    text = str(info.value)
    assert "tiny" in text and "stage s1" in text and "micro-batch 2" in text
    assert "engine 1" in text and "forward" in text
    define(pool, params, [0, 1])
    assert pipeline.run(x, 2, pool=pool).shape == (N, SIZES[2])


def test_magics_stage_and_pipeline(ip, pool, capsys):
    pool.pipeline.clear()
    params = model()[:2]
    x, t = data()
    ip.user_ns.update(np=np, W_init=params[0][0], b_init=params[0][1], act=True, N=N, lr=LR,
                      x=x, t=t)
    ip.run_cell_magic("stage", "l1 --engine 0", STAGE)
    ip.user_ns.update(W_init=params[1][0], b_init=params[1][1], act=False)
    ip.run_cell_magic("stage", "l2 --engine 1", STAGE)
    ip.run_line_magic("pipeline", "show")
    assert "l1" in capsys.readouterr().out
    ip.run_line_magic("pipeline", "run --input x --microbatches 4 --out y")
    assert ip.user_ns["y"].shape == (N, SIZES[2])
    ip.user_ns["t"] = ip.user_ns["y"] + 0.1
    ip.run_line_magic("pipeline", "train --input x --target t --microbatches 4 --schedule zb-h1 "
                                  "--steps 3 --out losses")
    losses = ip.user_ns["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "measured bubble" in capsys.readouterr().out
    ip.run_line_magic("pipeline", "schedule --stages 4 --microbatches 8 --schedule 1f1b")
    out = capsys.readouterr().out
    assert "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7" in out
    with pytest.raises(UsageError, match="not defined"):
        ip.run_line_magic("pipeline", "run --input nope --microbatches 2 --out y")


SLEEPY = """
import time

def forward(x, ctx):
    time.sleep(D)
    return x

def backward(grad, ctx):
    time.sleep(D)
    return grad

def loss(y, t):
    return 0.0, y
"""


@pytest.mark.parametrize("p, m", [(2, 4), (2, 16), (4, 4), (4, 16)])
def test_measured_bubble_matches_the_simulation(pool, pool4, p, m):
    from nbparallel.pipeline import schedule as sched

    target = pool if p == 2 else pool4
    target.pipeline.clear()
    d = 0.03
    for k in range(p):
        pipeline.stage(f"z{k}", SLEEPY, engine=target.ids[k], namespace={"D": d}, pool=target)
    x = np.zeros((m, 2))
    pipeline.train(x, x, m, schedule="1f1b", pool=target)
    measured = target.pipeline.last[-1].bubble
    simulated = sched.simulate(sched.build("1f1b", p, m), sched.Costs(f=d, b=d)).bubble
    assert abs(measured - simulated) < 0.05, (measured, simulated)


SLEEPY_SPLIT = SLEEPY + """
def backward_input(grad, ctx):
    time.sleep(D / 2)
    return grad

def backward_weight(ctx):
    time.sleep(D / 2)
"""


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "interleaved", "interleaved-zb", "zb-v"])
def test_every_schedules_measured_bubble_is_its_simulation_for_the_measured_times(
        pool, pool4, p, schedule):
    target = pool if p == 2 else pool4
    engines = target.ids[:p]
    placed = (engines + engines[::-1] if schedule == "zb-v" else engines * 2
              if schedule.startswith("interleaved") else engines)
    target.pipeline.clear()
    for k, eid in enumerate(placed):
        pipeline.stage(f"z{k}", SLEEPY_SPLIT, engine=eid, namespace={"D": 0.06 / (len(placed) // p)},
                       pool=target)
    x = np.zeros((8, 2))
    pipeline.train(x, x, 8, schedule=schedule, pool=target)
    result = target.pipeline.last[-1]
    assert result.schedule.name == schedule
    assert abs(result.bubble - result.theory) < 0.05, (result.bubble, result.theory)


def test_theory_beside_a_measured_bubble_is_the_simulation_for_the_measured_op_times(pool):
    """Uneven stages (the second 6x cheaper) make a bubble no schedule removes: the theory shown
    is the simulation for the op times the run measured, the equal-stage figure beside it."""
    pool.pipeline.clear()
    for k, d in enumerate([0.03, 0.005]):
        pipeline.stage(f"u{k}", SLEEPY, engine=pool.ids[k], namespace={"D": d}, pool=pool)
    x = np.zeros((8, 2))
    pipeline.run(x, 8, pool=pool)
    result = pool.pipeline.last[-1]
    assert result.costs.stages[0][0] == pytest.approx(0.03, abs=0.01)
    assert result.costs.stages[1][0] == pytest.approx(0.005, abs=0.005)
    assert abs(result.bubble - result.theory) < 0.05, (result.bubble, result.theory)
    assert result.theory_equal == pytest.approx(1 / 9)  # gpipe's (p-1)/(m+p-1) for equal stages
    assert result.bubble > result.theory_equal + 0.2


def test_schedule_auto_picks_the_fastest_simulated_for_the_measured_times(pool):
    params = model()[:2]
    x, _ = data()
    define(pool, params, [0, 1])  # each stage defines backward and the split pair
    t = pipeline.run(x, 4, pool=pool) + 0.1
    said: list[str] = []
    losses = pool.pipeline.train(x, t, 4, "auto", 3, say=said.append)
    assert_like_one_process(pool, params, x, t, losses, 3)
    runs = pool.pipeline.last
    assert runs[0].schedule.name == "1f1b"
    chosen = runs[1].schedule.name
    assert chosen in ("1f1b", "zb-h1", "gpipe") and runs[2].schedule.name == chosen
    assert len(said) == 1 and f"{chosen} simulates fastest" in said[0], said
    assert "step 1 ran 1f1b" in said[0] and "I and W taken as half" in said[0]
    assert f"Steps 2-3 use {chosen}." in said[0]
    # The choice is the simulation's: no other candidate is faster for those times.
    from nbparallel.pipeline import choose

    rows = {r.name: r for r in choose.compare(2, 4, runs[0].costs, names=["1f1b", "zb-h1", "gpipe"])}
    assert rows[chosen].makespan == min(r.makespan for r in rows.values())


def test_schedule_auto_keeps_within_the_activation_budget_or_says_before_any_step(pool):
    params = model()[:2]
    x, _ = data()
    define(pool, params, [0, 1])
    t = pipeline.run(x, 4, pool=pool) + 0.1
    before = weights(pool)
    with pytest.raises(UsageError, match=r"keeps within --max-stash 1 .*the least is 1f1b, 2"):
        pool.pipeline.train(x, t, 4, "auto", 2, max_stash=1)
    for (W, b), (W2, b2) in zip(weights(pool), before):  # nothing trained
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    said: list[str] = []
    pool.pipeline.train(x, t, 4, "auto", 2, max_stash=2, say=said.append)
    assert all(r.schedule.name != "gpipe" for r in pool.pipeline.last)  # gpipe holds 4
    assert "within --max-stash 2" in said[0]


def _segments(pool):
    from nbparallel.dataplane.transports.shm import outbox_segments

    return {eid: sorted(pool.pool.apply(eid, outbox_segments).get()) for eid in pool.ids}


def _empty_outboxes(pool):
    """Start from no hand-off segments: earlier tests on this session's pool leave some (free ones
    of other sizes, or ones a value an engine kept still holds), and those are not this test's."""
    from nbparallel.dataplane.transports.shm import SharedMemory

    for eid in pool.ids:
        pool.pool.apply(eid, SharedMemory.reset).get()
    return {eid: len(names) for eid, names in _segments(pool).items()}


def test_large_activations_hand_off_through_shared_memory(pool):
    """Wide layers (512 KB per micro-batch each way) train exactly, through reused segments."""
    rng = np.random.default_rng(3)
    sizes = [6, 8192, 3]
    params = [(rng.standard_normal((i, o)) / np.sqrt(i), rng.standard_normal(o) * 0.1)
              for i, o in zip(sizes, sizes[1:])]
    x, t = data()
    define(pool, params, [0, 1])
    assert _empty_outboxes(pool) == {eid: 0 for eid in pool.ids}
    cursor = pool.transfers.cursor
    losses = pipeline.train(x, t, 4, schedule="1f1b", steps=2, pool=pool)
    assert_like_one_process(pool, params, x, t, losses, 2)
    moved = [r for r in pool.transfers.since(cursor)[0] if r.kind == "stage"]
    shm_bytes = sum(r.nbytes for r in moved if r.transport == "shm")
    assert {(r.engine, r.peer) for r in moved} == {(0, 1), (1, 0)}  # activations, gradients
    assert shm_bytes >= 2 * 2 * 4 * 8 * 8192 * 8  # steps x (activations + gradients) x m x rows x width
    # A warm pipeline reuses its segments. How many a sender needs depends on timing (whether
    # the receiver let go of the last activation before the next one is sent), but never more
    # than the values in flight: for 1F1B on 2 engines, the one the receiver holds in ctx, one
    # arrived and one being written. 3 more steps send 12 values each way through them.
    before = _segments(pool)
    assert sum(map(len, before.values())) >= 2
    pipeline.train(x, t, 4, schedule="1f1b", steps=3, pool=pool)
    after = _segments(pool)
    for eid, names in after.items():
        assert len(names) <= 3, (eid, names)
        assert set(before[eid]) <= set(names), (eid, before[eid], names)  # kept, not replaced
    y = pipeline.run(x, 4, pool=pool)
    assert y.shape == (N, 3)


def test_a_stage_keeping_its_input_holds_the_segment_until_it_lets_go(pool):
    pool.pipeline.clear()
    pipeline.stage("wide", "def forward(x, ctx):\n    return np.repeat(x, 20_000, axis=1)",
                   engine=0, namespace={"np": np}, pool=pool)
    pipeline.stage("keep", "kept = []\ndef forward(x, ctx):\n    kept.append(x)\n"
                   "    return x[:, :1].copy()", engine=1, pool=pool)
    x = np.arange(8.0).reshape(8, 1)
    for _ in range(3):
        y = pipeline.run(x, 2, pool=pool)
        np.testing.assert_array_equal(y, x)
    kept = pool.pipeline.pull("keep", "kept")
    # Six kept activations, each still intact although the sender sent more after them.
    assert len(kept) == 6
    for k, value in enumerate(kept):
        half = x[:4] if k % 2 == 0 else x[4:]
        np.testing.assert_array_equal(value, np.repeat(half, 20_000, axis=1))


def test_what_stages_print_shows_while_the_run_goes_on(pool, monkeypatch, record_stdout):
    import time

    pool.pipeline.clear()
    pipeline.stage("loud", "import time\ndef forward(x, ctx):\n    print('mb', int(x[0, 0]), flush=True)\n"
                   "    time.sleep(0.75)\n    return x", engine=0, pool=pool)
    pipeline.stage("quiet", "def forward(x, ctx):\n    return x", engine=1, pool=pool)
    recorder = record_stdout()
    t0 = time.monotonic()
    y = pipeline.run(np.arange(4.0).reshape(4, 1), 4, pool=pool, dashboard=False)
    took = time.monotonic() - t0
    monkeypatch.undo()
    np.testing.assert_array_equal(y, np.arange(4.0).reshape(4, 1))
    first = [t for t, text in recorder.writes if "[engine 0] mb 0" in text]
    assert first and first[0] - t0 < 1.5 < took  # long before the run ended
    text = "".join(t for _, t in recorder.writes)
    assert [text.count(f"[engine 0] mb {i}\n") for i in range(4)] == [1, 1, 1, 1]
    pool.pipeline.clear()


def test_pipeline_schedule_compare_magic_prints_every_schedule_for_the_costs(ip, capsys):
    ip.run_line_magic("pipeline", 'schedule --stages 4 --microbatches 8 --compare '
                                  '--costs "f=1 b=2 i=1 w=1 comm=0.5"')
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("4 engines, 8 micro-batches, interleaved with v=2; op times f=1 b=2 i=1 w=1, "
                      "comm=0.5:")
    rows = [line.split() for line in out[2:8]]
    assert [r[0] for r in rows][0] == "zb-v" and rows[0][3] == "1.00x"
    assert {r[0] for r in rows} == {"gpipe", "1f1b", "interleaved", "zb-h1", "interleaved-zb", "zb-v"}
