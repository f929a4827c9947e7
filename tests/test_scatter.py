"""%%scatter on real engines: the contract, halos, auto-sent names, and every bad input."""

import numpy as np
import pytest

import nbparallel
from nbparallel.errors import PoolError, RemoteError, UsageError

pytestmark = pytest.mark.cluster


def test_contract_example_on_two_engines_equals_single_process(ip):
    rng = np.random.default_rng(0)
    a, b, w = rng.random((1001, 3)), rng.random((1001, 3)), rng.random(3)
    ip.user_ns.update(a=a, b=b, w=w)
    ip.run_cell_magic("scatter", "a b --broadcast w --gather c --reduce s=sum --engines 0-1",
                      "c = a * w + b\ns = float(c.sum())")
    np.testing.assert_array_equal(ip.user_ns["c"], a * w + b)
    # Two partial float sums added together differ from one sum only by rounding.
    assert ip.user_ns["s"] == pytest.approx(float((a * w + b).sum()), rel=1e-12)


def _blur_reference(img):
    padded = np.pad(img, 1, mode="edge")
    h, w = img.shape
    return sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


BLUR_CELL = """
padded = xp.pad(img, 1, mode="edge")
h, w = img.shape
blurred = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
lo, hi = halo
out = blurred[lo:h - hi]
"""


@pytest.mark.parametrize("engines", ["0", "0-1", "0-2"])
def test_box_blur_with_halo_equals_single_process_bit_for_bit(ip, engines):
    img = np.random.default_rng(1).random((97, 61))
    ip.user_ns["img"] = img
    ip.run_cell_magic("scatter", f"img --halo 1 --gather out --engines {engines}", BLUR_CELL)
    out = ip.user_ns["out"]
    assert out.shape == img.shape
    assert np.array_equal(out, _blur_reference(img))  # bit for bit, not approximately


def test_lists_tuples_axis_and_reduce_ops(ip):
    ip.user_ns.update(words=[f"w{i}" for i in range(10)], m=np.arange(24).reshape(2, 12))
    ip.run_cell_magic("scatter", "words --gather up --reduce n=sum parts=list",
                      "up = [x.upper() for x in words]\nn = len(words)\nparts = (rank, len(words))")
    assert ip.user_ns["up"] == [f"W{i}" for i in range(10)]
    assert ip.user_ns["n"] == 10
    assert ip.user_ns["parts"] == [(0, 4), (1, 3), (2, 3)]
    ip.run_cell_magic("scatter", "m --axis 1 --gather d --reduce col=max total=prod",
                      "d = m * 10\ncol = m.max(axis=1)\ntotal = m.shape[1]")
    np.testing.assert_array_equal(ip.user_ns["d"], np.arange(24).reshape(2, 12) * 10)
    np.testing.assert_array_equal(ip.user_ns["col"], [11, 23])
    assert ip.user_ns["total"] == 4 * 4 * 4


def test_rank_size_and_labelled_output(ip, capfd):
    ip.user_ns["x"] = np.arange(6)
    ip.run_cell_magic("scatter", "x --reduce who=list",
                      "who = (rank, size, xp.__name__)\nprint('hello from', rank)")
    assert ip.user_ns["who"] == [(0, 3, "numpy"), (1, 3, "numpy"), (2, 3, "numpy")]
    out = capfd.readouterr().out
    for eid in range(3):
        assert f"[engine {eid}] hello from {eid}" in out


def test_notebook_functions_classes_modules_and_values_travel_automatically(ip):
    ip.run_cell("import math\nimport numpy as np\nscale = 3\n"
                "class P:\n    def __init__(self, v): self.v = v\n"
                "def helper(v):\n    return P(v * scale).v + math.floor(0.5)\n"
                "data = np.arange(9)")
    ip.run_cell_magic("scatter", "data --gather r", "r = np.array([helper(v) for v in data])")
    np.testing.assert_array_equal(ip.user_ns["r"], np.arange(9) * 3)


def test_value_over_auto_send_limit_is_refused_with_broadcast_hint(ip):
    ip.user_ns.update(x=np.arange(4), big=np.zeros(2_000_000), c="before")
    with pytest.raises(UsageError, match=r"reads `big` \(15.3 MiB\).*--broadcast big"):
        ip.run_cell_magic("scatter", "x --gather c", "c = x + big[:len(x)]")
    assert ip.user_ns["c"] == "before"
    ip.run_cell_magic("scatter", "x --broadcast big --gather c", "c = x + big[:len(x)]")
    np.testing.assert_array_equal(ip.user_ns["c"], np.arange(4))


def test_python_twin(pool):
    out = nbparallel.scatter("y = x * k\nn = len(x)", {"x": np.arange(7)}, broadcast={"k": 2},
                             gather=["y"], reduce={"n": "sum"})
    np.testing.assert_array_equal(out["y"], np.arange(7) * 2)
    assert out["n"] == 7


def test_remote_exception_shows_user_line_engine_and_rank(ip):
    ip.user_ns.update(x=np.arange(6), c="before")
    with pytest.raises(RemoteError) as info:
        ip.run_cell_magic("scatter", "x --gather c",
                          "c = x * 2\nif rank == 1:\n    raise ValueError('bad shard ' + str(x))")
    msg = str(info.value)
    assert "failed on engine 1, rank 1: ValueError: bad shard [2 3]" in msg
    assert 'File "<%%scatter cell>", line 3' in msg
    assert "raise ValueError('bad shard ' + str(x))" in msg
    assert "runner.py" not in msg  # our own frames are not the user's concern
    assert info.value.engine == 1
    assert ip.user_ns["c"] == "before"


# -- bad input: a clear error and no notebook variable changed ---------------------------------
BAD_INPUTS = [
    ("nope --gather c", "c = nope", "`nope` (to scatter) is not defined in the notebook"),
    ("d --gather c", "c = d", "`d` is a dict, which cannot be split across engines"),
    ("a --axis 3 --gather c", "c = a", "--axis 3 is out of range for `a`"),
    ("a short --gather c", "c = a", "`a` has 12, `short` has 5"),
    ("tiny --gather c", "c = tiny", "`tiny` has 2 row(s) along axis 0 but the cell would run on 3"),
    ("empty --gather c", "c = empty", "`empty` is empty along axis 0"),
    ("a --reduce c=avg", "c = a", "unknown reduce operation 'avg'"),
    ("a --reduce c=sum", "c = a[:rank + 1]", "cannot reduce `c` with sum: engines returned different shapes"),
    ("a --gather c", "c = (a", "syntax error on line 1"),
    ("a --gather c --engines 0-", "c = a", "cannot read --engines '0-'"),
    ("a --gather c --engines 0,7", "c = a", "engine(s) 7, which the pool does not have; available: 0-2"),
    ("a --gather c", "x = 1", "the cell did not define `c` on engine 0 (rank 0)"),
    ("a --gather c --reduce c=sum", "c = a", "`c` is asked for twice"),
    ("a --broadcast a --gather c", "c = a", "`a` is listed twice"),
    ("a --gather rank", "pass", "rank cannot be scattered, broadcast or returned"),
    ("a --reduce c", "c = a", "cannot read --reduce 'c'; write NAME=OP"),
    ("a --gather c", "c = float(a.sum())", "each engine returned a single number"),
]


@pytest.mark.parametrize("line, cell, message", BAD_INPUTS, ids=[b[2][:40] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_changes_nothing(ip, line, cell, message):
    ip.user_ns.update(a=np.arange(12), short=np.arange(5), tiny=np.arange(2), empty=np.zeros(0),
                      d={"k": 1}, c="before")
    before = dict(ip.user_ns)
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("scatter", line, cell)
    assert message in str(info.value)
    assert ip.user_ns["c"] == "before"
    assert set(ip.user_ns) == set(before)


def test_engines_stay_usable_after_errors(ip):
    ip.user_ns["a"] = np.arange(9)
    with pytest.raises(RemoteError):
        ip.run_cell_magic("scatter", "a --gather c", "c = 1 / 0")
    ip.run_cell_magic("scatter", "a --gather c", "c = a + 1")
    np.testing.assert_array_equal(ip.user_ns["c"], np.arange(1, 10))


def test_connect_without_a_cluster_is_a_clear_error(pool):
    with pytest.raises(PoolError, match="no cluster to connect to.*ipcluster start -n 4 --profile=nothere"):
        nbparallel.connect(profile="nothere")
    assert nbparallel.current() is pool  # the working pool is kept


def test_an_engine_dying_mid_cell_is_named_and_nothing_is_bound(ip):
    # A pool of its own: one engine exits for real.
    pool = nbparallel.Session(nbparallel.Pool.start(2))
    try:
        with pytest.raises(RemoteError) as info:
            nbparallel.scatter("import os\nif rank == 1:\n    os._exit(1)\ny = x",
                               {"x": np.arange(4)}, gather=["y"], pool=pool)
        assert "failed on engine 1, rank 1: EngineDied" in str(info.value)
        assert pool.ids == [0]  # the survivor still answers
        out = nbparallel.scatter("y = x", {"x": np.arange(4)}, gather=["y"], pool=pool)
        np.testing.assert_array_equal(out["y"], np.arange(4))
    finally:
        pool.stop()


def test_what_a_cell_prints_shows_while_it_runs(ip, monkeypatch, record_stdout):
    import time

    recorder = record_stdout()
    t0 = time.monotonic()
    ip.run_cell_magic("scatter", "--engines 0-1 --no-dashboard",
                      "import time\nprint('hello from', rank, flush=True)\ntime.sleep(3)\n"
                      "print('bye', rank)")
    took = time.monotonic() - t0
    monkeypatch.undo()
    first = {t for t, text in recorder.writes if "hello from" in text}
    assert first and min(first) - t0 < 1.5 < took  # long before the cell ended
    text = "".join(t for _, t in recorder.writes)
    for r in (0, 1):  # every line once, labelled, the last ones at the end
        assert text.count(f"[engine {r}] hello from {r}\n") == 1
        assert text.count(f"[engine {r}] bye {r}\n") == 1


def test_a_flood_of_output_is_cut_to_a_few_hundred_lines_a_second():
    import io
    import sys

    from nbparallel.relay import Relay

    class Task:  # what the relay reads of an ipyparallel AsyncResult: its output so far
        stdout = ""
        stderr = ""

    now = [0.0]
    relay = Relay(clock=lambda: now[0])
    task = Task()
    out, err = io.StringIO(), io.StringIO()
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        task.stdout = "".join(f"line {i}\n" for i in range(1000)) + "partial"
        relay.tick([task], [3])
        assert out.getvalue().count("\n") == Relay.LINES_PER_SECOND  # the first 200, at once
        assert "partial" not in out.getvalue()  # a line is shown once it is complete
        now[0] = 1.5
        relay.tick([task], [3])
        assert "800 lines of engine output were not shown" in err.getvalue()
        task.stdout += " end\n"
        relay.show(task, 3, final=True)
        assert out.getvalue().endswith("[engine 3] partial end\n")
    finally:
        sys.stdout, sys.stderr = real
