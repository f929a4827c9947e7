"""``nbparallel.tp``'s tensor-parallel layers on real engines with a real ``comm``: a two-layer MLP
gives one process's output and gradients, with one all-reduce forward and one backward (counted
from the comm spans the engines report), SGD trains like one process, every bad input is a
one-paragraph UsageError, and the module's examples run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import nbparallel.tp as tp
from nbparallel.errors import RemoteError, UsageError
from nbparallel.tp import ColumnParallelLinear, RowParallelLinear, gather_columns, sgd, split_bounds

pytestmark = pytest.mark.cluster

RTOL = 1e-10

MLP = """
import time
import numpy as np
from nbparallel.tp import ColumnParallelLinear, RowParallelLinear, gather_columns
fc1 = ColumnParallelLinear(W1, b1, rank=comm.rank, size=comm.size)
fc2 = RowParallelLinear(W2, b2, rank=comm.rank, size=comm.size)
ctx = {}
t0 = time.time()
h = np.tanh(fc1.forward(x, ctx))
y = fc2.forward(h, ctx, comm)
t1 = time.time()
gh = fc2.backward(gy, ctx) * (1 - h ** 2)
gx = fc1.backward(gh, ctx, comm)
t2 = time.time()
pre = gather_columns(fc1.forward(x, {}), comm)
out = dict(y=y, gx=gx, pre=pre, cols=fc1.cols, rows=fc2.rows, left=sorted(ctx),
           contiguous=(fc1.weight.flags.c_contiguous, fc2.weight.flags.c_contiguous),
           gW1=fc1.grad_weight, gb1=fc1.grad_bias, gW2=fc2.grad_weight, gb2=fc2.grad_bias,
           times=(t0, t1, t2))
"""


def _reference(x, W1, b1, W2, b2, gy):
    """The same MLP in one process, plain NumPy."""
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gy.reshape(-1, gy.shape[-1])
    pre = x2 @ W1 + b1
    h = np.tanh(pre)
    y = h @ W2 + b2
    gh = (g2 @ W2.T) * (1 - h ** 2)
    gx = gh @ W1.T
    lead = x.shape[:-1]
    return dict(y=y.reshape(lead + (-1,)), gx=gx.reshape(lead + (-1,)), pre=pre.reshape(lead + (-1,)),
                gW1=x2.T @ gh, gb1=gh.sum(0), gW2=h.T @ g2, gb2=g2.sum(0))


def _comm_spans(pool, cursor, engines):
    spans, _ = pool.monitor.spans.since(cursor)
    return {e: [s for s in spans if s.kind == "comm" and s.engine == e] for e in engines}


@pytest.mark.parametrize("n, batch, hidden", [(2, (6,), 8), (3, (3, 4), 16)],
                         ids=["2 engines, even", "3 engines, hidden 16 uneven, 3-D input"])
def test_an_mlp_matches_one_process_with_one_allreduce_each_way(ip, pool, n, batch, hidden):
    rng = np.random.default_rng(n)
    n_in, n_out = 5, 4
    data = dict(x=rng.standard_normal(batch + (n_in,)), W1=rng.standard_normal((n_in, hidden)),
                b1=rng.standard_normal(hidden), W2=rng.standard_normal((hidden, n_out)),
                b2=rng.standard_normal(n_out), gy=rng.standard_normal(batch + (n_out,)))
    ip.user_ns.update(data)
    engines = list(range(n))
    cursor = pool.monitor.spans.cursor
    ip.run_cell_magic("scatter", f"--broadcast x W1 b1 W2 b2 gy --engines 0-{n - 1} --reduce out=list",
                      MLP)
    outs = ip.user_ns["out"]
    ref = _reference(**data)
    assert len(outs) == n

    # Uneven blocks follow numpy.array_split, the same for fc1's columns and fc2's rows.
    expected = [(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(hidden), n)]
    assert [o["cols"] for o in outs] == [o["rows"] for o in outs] == expected == split_bounds(hidden, n)
    if hidden % n:
        assert len({hi - lo for lo, hi in expected}) == 2
    assert all(o["contiguous"] == (True, True) and o["left"] == [] for o in outs)

    # Output and input gradient: whole and bit for bit the same on every rank, equal to one process.
    for o in outs:
        for name in ("y", "gx", "pre"):
            assert o[name].shape == ref[name].shape
            assert o[name].tobytes() == outs[0][name].tobytes(), name
            np.testing.assert_allclose(o[name], ref[name], rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(o["gb2"], ref["gb2"], rtol=RTOL)  # replicated bias: everywhere
    # Weight gradients: each rank's block, put back together in rank order.
    np.testing.assert_allclose(np.concatenate([o["gW1"] for o in outs], axis=1), ref["gW1"], rtol=RTOL)
    np.testing.assert_allclose(np.concatenate([o["gb1"] for o in outs]), ref["gb1"], rtol=RTOL)
    np.testing.assert_allclose(np.concatenate([o["gW2"] for o in outs], axis=0), ref["gW2"], rtol=RTOL)

    # What the engines' comms reported: one call forward, one backward, one for gather_columns.
    spans = _comm_spans(pool, cursor, engines)
    for e, o in zip(engines, outs):
        t0, t1, t2 = (t - pool.monitor.offset(e) for t in o["times"])
        forward = [s for s in spans[e] if t0 <= s.start and s.end <= t1]
        backward = [s for s in spans[e] if t1 <= s.start and s.end <= t2]
        assert (len(forward), len(backward), len(spans[e])) == (1, 1, 3), f"engine {e}"


TRAIN = """
import numpy as np
from nbparallel.tp import ColumnParallelLinear, RowParallelLinear, sgd
fc1 = ColumnParallelLinear(W1, b1, rank=rank, size=size)
fc2 = RowParallelLinear(W2, b2, rank=rank, size=size)
losses = []
for step in range(3):
    ctx = {}
    h = np.tanh(fc1.forward(x, ctx))
    y = fc2.forward(h, ctx, comm)
    losses.append(0.5 * float(((y - t) ** 2).sum()))
    gh = fc2.backward(y - t, ctx) * (1 - h ** 2)
    fc1.backward(gh, ctx, comm)
    sgd(fc1.parameters() + fc2.parameters(), fc1.gradients() + fc2.gradients(), lr)
out = dict(W1=fc1.weight, b1=fc1.bias, W2=fc2.weight, b2=fc2.bias, losses=losses,
           zeroed=all(not g.any() for g in fc1.gradients() + fc2.gradients()))
"""


def test_sgd_trains_like_one_process(ip):
    rng = np.random.default_rng(7)
    x, t = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
    W1, b1 = rng.standard_normal((5, 16)) / 2, rng.standard_normal(16) / 2
    W2, b2 = rng.standard_normal((16, 3)) / 2, rng.standard_normal(3) / 2
    lr = 0.02
    ip.user_ns.update(x=x, t=t, W1=W1, b1=b1, W2=W2, b2=b2, lr=lr)
    ip.run_cell_magic("scatter", "--broadcast x t W1 b1 W2 b2 --reduce out=list", TRAIN)
    outs = ip.user_ns["out"]
    assert len(outs) == 3

    P = [W1.copy(), b1.copy(), W2.copy(), b2.copy()]
    losses = []
    for _ in range(3):
        h = np.tanh(x @ P[0] + P[1])
        y = h @ P[2] + P[3]
        losses.append(0.5 * float(((y - t) ** 2).sum()))
        gh = ((y - t) @ P[2].T) * (1 - h ** 2)
        grads = [x.T @ gh, gh.sum(0), h.T @ (y - t), (y - t).sum(0)]
        P = [p - lr * g for p, g in zip(P, grads)]
    assert losses[2] < losses[1] < losses[0]  # it trains (the comparison below means something)
    for o in outs:
        np.testing.assert_allclose(o["losses"], losses, rtol=RTOL)
        np.testing.assert_allclose(o["b2"], P[3], rtol=RTOL)
        assert o["zeroed"]
    np.testing.assert_allclose(np.concatenate([o["W1"] for o in outs], axis=1), P[0], rtol=RTOL)
    np.testing.assert_allclose(np.concatenate([o["b1"] for o in outs]), P[1], rtol=RTOL)
    np.testing.assert_allclose(np.concatenate([o["W2"] for o in outs], axis=0), P[2], rtol=RTOL)


def test_a_layer_built_for_another_size_fails_on_every_rank_before_any_call(ip):
    ip.user_ns["W"] = np.ones((4, 6))
    with pytest.raises(RemoteError) as info:
        ip.run_cell_magic("scatter", "--broadcast W --engines 0-1", """
import numpy as np
from nbparallel.tp import ColumnParallelLinear
fc = ColumnParallelLinear(W, rank=comm.rank, size=3)
ctx = {}
fc.backward(fc.forward(np.ones((2, 4)), ctx), ctx, comm)
""")
    assert len(info.value.failures) == 2
    assert {f.ename for f in info.value.failures} == {"UsageError"}
    assert "built for size=3 ranks, but this comm has 2" in str(info.value)


# -- in one process: sizes of 1 need no comm, argument checks need no engine ----------------------
def test_with_size_1_the_layers_are_plain_linear_layers():
    rng = np.random.default_rng(1)
    x, W1, b1 = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 6)), rng.standard_normal(6)
    W2, b2, gy = rng.standard_normal((6, 2)), rng.standard_normal(2), rng.standard_normal((2, 3, 2))
    fc1, fc2 = ColumnParallelLinear(W1, b1, rank=0, size=1), RowParallelLinear(W2, b2, rank=0, size=1)
    assert not np.shares_memory(fc1.weight, W1) and not np.shares_memory(fc2.bias, b2)
    ctx: dict = {}
    h = np.tanh(fc1.forward(x, ctx))
    y = fc2.forward(h, ctx, None)
    assert len(ctx) == 2  # one key per layer
    gx = fc1.backward(fc2.backward(gy, ctx) * (1 - h ** 2), ctx, None)
    ref = _reference(x, W1, b1, W2, b2, gy)
    np.testing.assert_allclose(y, ref["y"], rtol=RTOL)
    np.testing.assert_allclose(gx, ref["gx"], rtol=RTOL)
    for got, want in zip(fc1.gradients() + fc2.gradients(), ["gW1", "gb1", "gW2", "gb2"]):
        np.testing.assert_allclose(got, ref[want], rtol=RTOL)
    assert ctx == {}
    fc1.zero_grad()
    assert not any(g.any() for g in fc1.gradients()) and fc2.grad_weight.any()
    plain = ColumnParallelLinear(W1, rank=0, size=1)  # no bias: one parameter, one gradient
    assert len(plain.parameters()) == len(plain.gradients()) == 1


def test_split_bounds_is_numpy_array_split():
    for n in range(12):
        for size in range(1, 5):
            lengths = [len(a) for a in np.array_split(np.arange(n), size)]
            starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            assert split_bounds(n, size) == list(zip(starts[:-1], starts[1:]))


W = np.zeros((4, 3))


@pytest.mark.parametrize("build, message", [
    (lambda: ColumnParallelLinear(W, rank=2, size=2), r"rank=2 is not a rank of 2: it must be 0 to 1"),
    (lambda: RowParallelLinear(W, rank=-1, size=2), r"rank=-1 is not a rank of 2"),
    (lambda: ColumnParallelLinear(W, rank=0, size=0), r"size=0 must be the number of ranks"),
    (lambda: ColumnParallelLinear(W, rank=True, size=2), r"rank=True is not a rank"),
    (lambda: ColumnParallelLinear(W, rank=0, size=4), r"has 3 output column\(s\) to split over size=4 "
                                                      r"ranks, so some rank would get 0 columns"),
    (lambda: RowParallelLinear(W, rank=0, size=5), r"has 4 input row\(s\) to split over size=5 ranks, "
                                                   r"so some rank would get 0 rows"),
    (lambda: ColumnParallelLinear(np.zeros(3), rank=0, size=1), r"weight must be 2-D.*shape \(3,\)"),
    (lambda: RowParallelLinear(np.zeros((2, 2, 2)), rank=0, size=1), r"weight must be 2-D"),
    (lambda: ColumnParallelLinear(W, np.zeros(4), rank=0, size=1), r"bias must have shape \(3,\).*\(4,\)"),
    (lambda: RowParallelLinear(W, np.zeros((3, 1)), rank=0, size=1), r"bias must have shape \(3,\)"),
    (lambda: split_bounds(3, 0), r"size=0 must be a whole number of ranks"),
    (lambda: split_bounds(-1, 2), r"n=-1 must be a whole number"),
], ids=["rank too big", "rank negative", "size 0", "rank bool", "too few columns", "too few rows",
        "1-D weight", "3-D weight", "column bias length", "row bias 2-D", "split size", "split n"])
def test_bad_construction_is_a_usage_error(build, message):
    with pytest.raises(UsageError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


def _column(size=2, rank=0):
    return ColumnParallelLinear(np.ones((4, 5)), np.ones(5), rank=rank, size=size)


def _row(size=2, rank=1):
    return RowParallelLinear(np.ones((5, 3)), np.ones(3), rank=rank, size=size)  # rank 1: rows 3:5


def _after_forward(layer, x, comm=None):
    ctx: dict = {}
    if isinstance(layer, RowParallelLinear):
        layer.forward(x, ctx, comm)
    else:
        layer.forward(x, ctx)
    return ctx


FAKE = SimpleNamespace  # a comm's .size and .rank, for argument checks that happen before any call


@pytest.mark.parametrize("call, message", [
    (lambda: _column().forward(np.ones((2, 5)), {}),
     r"ColumnParallelLinear.forward: the input's last dimension must be 4, the full input.*\(2, 5\)"),
    (lambda: _column().forward(np.float64(1.0), {}), r"last dimension must be 4"),
    (lambda: _row().forward(np.ones((2, 3)), {}, FAKE(size=2, rank=1)),
     r"RowParallelLinear.forward: the input's last dimension must be 2, this rank's block of the "
     r"input, columns 3:5 of 5"),
    (lambda: _column(size=1).backward(np.ones((2, 5)), {}, None),
     r"ColumnParallelLinear.backward: ctx holds no input saved by this layer's forward: backward was "
     r"called before forward"),
    (lambda: _row(size=1, rank=0).backward(np.ones((2, 3)), {"other": 1}),
     r"RowParallelLinear.backward: ctx holds no input.*before forward"),
    (lambda: _column(size=1).backward(np.ones((2, 5)), _after_forward(_column(size=1), np.ones((2, 4))),
                                      None),
     r"before forward"),  # another layer's saved input is not this one's
    (lambda: _column(size=1).forward(np.ones(4), []), r"ctx must be a dict"),
    (lambda: _column().backward(np.ones((2, 3)), {}, FAKE(size=3, rank=0)),
     r"built for size=2 ranks, but this comm has 3"),
    (lambda: _row().forward(np.ones((2, 2)), {}, FAKE(size=4, rank=1)),
     r"built for size=2 ranks, but this comm has 4"),
    (lambda: _row().forward(np.ones((2, 2)), {}, FAKE(size=2, rank=0)),
     r"built for rank 1, but this comm's rank is 0"),
    (lambda: _column().backward(np.ones((2, 3)), {}, None), r"needs the cell's comm.*split over 2 ranks"),
    (lambda: _row().forward(np.ones((2, 2)), {}, object()), r"has no \.size and \.rank"),
    (lambda: gather_columns(np.ones((2, 2)), None), r"gather_columns needs the cell's comm"),
    (lambda: sgd([np.ones(2)], [], 0.1), r"1 parameters but 0 gradients"),
    (lambda: sgd([np.ones(2)], [np.ones(3)], 0.1), r"parameter 0 has shape \(2,\) but its gradient \(3,\)"),
], ids=["column x width", "column x scalar", "row x width", "column backward first", "row backward first",
        "other layer's ctx", "ctx not a dict", "column comm size", "row comm size", "row comm rank",
        "no comm", "not a comm", "gather no comm", "sgd lengths", "sgd shapes"])
def test_bad_calls_are_usage_errors_naming_the_problem(call, message):
    with pytest.raises(UsageError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_backward_twice_and_bad_gradients_are_usage_errors():
    fc = _column(size=1)
    ctx = _after_forward(fc, np.ones((2, 3, 4)))
    with pytest.raises(UsageError, match=r"gradient must have shape \(2, 3, 5\).*\(2, 5\)"):
        fc.backward(np.ones((2, 5)), ctx, None)
    fc.backward(np.ones((2, 3, 5)), ctx, None)
    with pytest.raises(UsageError, match="or twice"):
        fc.backward(np.ones((2, 3, 5)), ctx, None)
    row = _row(size=1, rank=0)
    ctx = _after_forward(row, np.ones((2, 5)))
    with pytest.raises(UsageError, match=r"gradient must have shape \(2, 3\) .*then 3: the full output"):
        row.backward(np.ones((2, 1)), ctx)



def test_every_public_item_has_an_example():
    items = [getattr(tp, n) for n in tp.__all__]
    items += [getattr(c, m) for c in (ColumnParallelLinear, RowParallelLinear)
              for m in ("forward", "backward", "parameters", "gradients", "zero_grad")]
    assert tp.__doc__ and "%%scatter" in tp.__doc__ and "RowParallelLinear(" in tp.__doc__
    for item in items:
        doc = item.__doc__ or ""
        assert ">>>" in doc or "::" in doc, item


@pytest.mark.gpu
def test_cupy_weights_give_cupy_results(cuda):
    rng = np.random.default_rng(3)
    x, W1, W2, gy = (rng.standard_normal(s) for s in [(3, 4), (4, 6), (6, 2), (3, 2)])
    fc1 = ColumnParallelLinear(cuda.asarray(W1), cuda.zeros(6), rank=0, size=1)
    fc2 = RowParallelLinear(cuda.asarray(W2), rank=0, size=1)
    assert fc1.xp is cuda and type(fc1.grad_weight) is cuda.ndarray
    ctx: dict = {}
    h = cuda.tanh(fc1.forward(cuda.asarray(x), ctx))
    y = fc2.forward(h, ctx, None)
    gx = fc1.backward(fc2.backward(cuda.asarray(gy), ctx) * (1 - h ** 2), ctx, None)
    ref = _reference(x, W1, np.zeros(6), W2, np.zeros(2), gy)
    assert type(y) is cuda.ndarray and type(gx) is cuda.ndarray
    np.testing.assert_allclose(y.get(), ref["y"], rtol=1e-10)
    np.testing.assert_allclose(gx.get(), ref["gx"], rtol=1e-10)
    with pytest.raises(UsageError, match="input is a NumPy"):
        fc1.forward(x, {})
