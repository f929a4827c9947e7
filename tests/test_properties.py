"""Property tests (Hypothesis) beyond test_partition.py and test_schedule.py; no cluster.

test_partition.py proves split-then-join for float64 arrays of up to 3 dimensions, lists and tuples,
and halos along axis 0 of 2-D arrays; test_schedule.py proves every training schedule valid for
p <= 6, m <= 12, v <= 3. Here:

* split then join for any dtype (byte orders, strings, datetimes, structured records, objects),
  zero-length side dimensions, non-contiguous inputs and 1 to 8 engines;
* halos along any axis of any array: trimming each shard's halo and joining gives the array back;
* the bytes path of the data plane: each shard placed into a shared-memory segment (what
  ``%%scatter`` sends to engines on this host) or pickled out of band (what the direct channel
  sends), opened again the way an engine opens it, then joined, is the array, dtype included;
* interleaved schedules drawn with m a multiple of p (so none is thrown away), more virtual
  stages, and the forward-only orders ``%pipeline run`` executes, valid and deadlock-free.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nbparallel import partition
from nbparallel.dataplane import parcel
from nbparallel.dataplane.shm import Segment, available
from nbparallel.pipeline import runtime
from nbparallel.pipeline import schedule as sched

MAX_ENGINES = 8


def dtypes() -> st.SearchStrategy[np.dtype]:
    scalar = st.one_of(
        hnp.boolean_dtypes(),
        hnp.integer_dtypes(endianness="?"),
        hnp.unsigned_integer_dtypes(endianness="?"),
        hnp.floating_dtypes(endianness="?"),
        hnp.complex_number_dtypes(endianness="?"),
        hnp.datetime64_dtypes(endianness="?"),
        hnp.timedelta64_dtypes(endianness="?"),
        hnp.unicode_string_dtypes(endianness="?"),
        hnp.byte_string_dtypes(),
    )
    return st.one_of(scalar, hnp.array_dtypes(scalar, min_size=1, max_size=3))


def arrays(min_dims: int = 1, max_dims: int = 4, max_side: int = 9,
           dtype: st.SearchStrategy | None = None) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(dtype if dtype is not None else dtypes(),
                      hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0,
                                       max_side=max_side))


def same(a: np.ndarray, b: np.ndarray) -> None:
    """Same shape, dtype and bytes (so NaN payloads, -0.0 and NaT count too).

    The byte order may differ: numpy.concatenate, like every numpy operation that makes a new
    array, returns native byte order, so a big-endian array (FITS files, network data) comes back
    with the same values in native order.
    """
    assert a.shape == b.shape
    a, b = (np.ascontiguousarray(x).astype(x.dtype.newbyteorder("="), copy=False) for x in (a, b))
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.tobytes() == b.tobytes()


@st.composite
def split_case(draw, max_dims: int = 4, dtype=None):
    """An array, an axis with at least one row, and an engine count no larger than its rows."""
    arr = draw(arrays(max_dims=max_dims, dtype=dtype))
    axes = [ax for ax in range(arr.ndim) if arr.shape[ax] >= 1]
    assume(axes)
    axis = draw(st.sampled_from(axes))
    n = draw(st.integers(1, min(MAX_ENGINES, arr.shape[axis])))
    if draw(st.booleans()):  # a reversed view: negative strides, not contiguous
        arr = np.flip(arr, axis=draw(st.integers(0, arr.ndim - 1)))
    if draw(st.booleans()):
        axis -= arr.ndim  # negative axes mean the same thing
    return arr, axis, n


# -- split / join -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(case=split_case())
def test_split_then_join_is_the_identity_for_any_dtype_shape_axis_and_engine_count(case):
    arr, axis, n = case
    shards = partition.split(arr, n, axis=axis)
    assert len(shards) == n
    ax = axis % arr.ndim
    # Exactly numpy.array_split's boundaries, every shard non-empty, views not copies.
    want = np.array_split(arr, n, axis=ax)
    for shard, expected in zip(shards, want):
        same(shard.value, expected)
        assert shard.value.shape[ax] >= 1
        assert shard.value.size == 0 or np.shares_memory(shard.value, arr)
    same(partition.join([s.value for s in shards], ax), arr)


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none(),
                                st.tuples(st.integers())), min_size=1, max_size=40),
       data=st.data())
def test_split_then_join_is_the_identity_for_lists_and_tuples_of_anything(items, data):
    n = data.draw(st.integers(1, min(MAX_ENGINES, len(items))))
    for value in (items, tuple(items)):
        shards = partition.split(value, n)
        assert [s.stop - s.start for s in shards] == [len(s.value) for s in shards]
        assert all(type(s.value) is type(value) for s in shards)
        assert partition.join([s.value for s in shards]) == value


@settings(max_examples=300, deadline=None)
@given(case=split_case(), k=st.integers(0, 6))
def test_trimming_the_halos_then_joining_is_the_identity_on_any_axis(case, k):
    arr, axis, n = case
    ax = axis % arr.ndim
    rows = arr.shape[ax]
    shards = partition.split(arr, n, axis=axis, halo=k)
    trimmed = []
    for shard in shards:
        lo, hi = shard.halo
        assert (lo, hi) == (min(k, shard.start), min(k, rows - shard.stop))
        index = (slice(None),) * ax + (slice(shard.start - lo, shard.stop + hi),)
        same(shard.value, arr[index])  # the halo rows are the neighbours' rows
        length = shard.value.shape[ax]
        trimmed.append(shard.value[(slice(None),) * ax + (slice(lo, length - hi),)])
    same(partition.join(trimmed, ax), arr)


@settings(max_examples=100, deadline=None)
@given(items=st.lists(st.integers(), min_size=1, max_size=30), data=st.data())
def test_trimming_list_halos_then_joining_is_the_identity(items, data):
    n = data.draw(st.integers(1, min(MAX_ENGINES, len(items))))
    k = data.draw(st.integers(0, 4))
    shards = partition.split(items, n, halo=k)
    trimmed = [s.value[s.halo[0]:len(s.value) - s.halo[1]] for s in shards]
    assert partition.join(trimmed) == items


# -- the bytes path of the data plane ------------------------------------------------------------


def big_enough(dtype: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """Cases whose shards are large enough to leave the ipyparallel message (>= 64 KiB)."""
    return split_case(max_dims=2, dtype=dtype).map(
        lambda case: (np.repeat(case[0], -(-parcel.INLINE_LIMIT // max(case[0].nbytes, 1))
                                * MAX_ENGINES, axis=case[1]), case[1], case[2]))


@pytest.mark.skipif(not available(), reason="no writable /dev/shm")
@settings(max_examples=150, deadline=None)
@given(case=split_case(max_dims=3) | big_enough(), readonly=st.booleans())
def test_shards_placed_in_shared_memory_and_opened_again_join_to_the_array(case, readonly):
    arr, axis, n = case
    ax = axis % arr.ndim
    layout = parcel.Layout()
    makers = [layout.add(shard.value, readonly) for shard in partition.split(arr, n, axis=axis)]
    seg = Segment.create(max(layout.nbytes, 1))
    try:
        layout.write(seg)
        entries = [make(seg) for make in makers]
        # What an engine does with the entries it gets (dataplane/transports/shm.py, open).
        opened = [parcel.open_entry(e, lambda name, size, offset, nbytes: seg.token(offset, nbytes))
                  for e in entries]
        joined = partition.join(opened, ax)
        same(joined, arr)
        if readonly:
            assert not any(isinstance(o, np.ndarray) and o.flags.writeable
                           for o, e in zip(opened, entries) if not isinstance(e, parcel.Inline))
        del opened, joined
    finally:
        seg.unlink()
        seg.close()


@settings(max_examples=150, deadline=None)
@given(case=split_case(max_dims=3) | big_enough())
def test_shards_pickled_out_of_band_and_loaded_again_join_to_the_array(case):
    """What the signed direct channel carries: a header and the large buffers beside it."""
    arr, axis, n = case
    parts = []
    for shard in partition.split(arr, n, axis=axis):
        header, buffers = parcel.dumps({"x": shard.value})
        # The receiving engine gets the frames as bytes and makes them writable (store.py).
        parts.append(parcel.loads(header, [bytearray(parcel.raw(b)) for b in buffers])["x"])
    same(partition.join(parts, axis % arr.ndim), arr)


# -- schedules -----------------------------------------------------------------------------------


def deadlock_free(s: sched.Schedule) -> None:
    """Play the ranks' op lists with blocking receives: every op runs (independently of simulate)."""
    split = any(op.kind in "IW" for ops in s.ranks for op in ops)
    last = s.p * s.v - 1
    done: set[sched.Op] = set()
    pos = [0] * s.p
    progress = True
    while progress:
        progress = False
        for r, ops in enumerate(s.ranks):
            while pos[r] < len(ops):
                op = ops[pos[r]]
                need = []
                if op.kind == "F" and op.stage > 0:
                    need.append(sched.Op("F", op.stage - 1, op.mb))
                elif op.kind in "BI":
                    need.append(sched.Op("F", op.stage, op.mb))
                    if op.stage < last:
                        need.append(sched.Op("I" if split else "B", op.stage + 1, op.mb))
                elif op.kind == "W":
                    need.append(sched.Op("I", op.stage, op.mb))
                if not all(d in done for d in need):
                    break
                done.add(op)
                pos[r] += 1
                progress = True
    assert all(pos[r] == len(ops) for r, ops in enumerate(s.ranks)), f"{s.name} deadlocks"


@settings(max_examples=200, deadline=None)
@given(p=st.integers(1, 8), k=st.integers(1, 4), v=st.integers(1, 5))
def test_interleaved_schedules_with_m_a_multiple_of_p_are_valid_and_deadlock_free(p, k, v):
    s = sched.build("interleaved", p, p * k, v)
    sched.validate(s)
    deadlock_free(s)
    ops = [(r, op) for r, rank in enumerate(s.ranks) for op in rank]
    assert len(ops) == len(set(ops)) == 2 * p * v * p * k
    assert all(op.stage % p == r for r, op in ops)
    sim = sched.simulate(s)
    assert 0.0 <= sim.bubble < 1.0 and len(sim.spans) == len(ops)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b", "zb-h1"]), p=st.integers(1, 8), m=st.integers(1, 24))
def test_training_schedules_up_to_8_ranks_are_valid_and_deadlock_free(name, p, m):
    s = sched.build(name, p, m)
    sched.validate(s)
    deadlock_free(s)
    assert sum(map(len, s.ranks)) == p * m * (3 if name == "zb-h1" else 2)
    assert 0.0 <= sched.simulate(s).bubble < 1.0


@settings(max_examples=200, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 24), v=st.integers(1, 4))
def test_forward_only_orders_of_pipeline_run_are_valid_and_deadlock_free(p, m, v):
    """``%pipeline run`` executes gpipe forward-only, or its own order for virtual stages."""
    s = runtime._forward_only(p, m, v)
    assert not s.train and (s.p, s.m, s.v) == (p, m, v)
    sched.validate(s)
    deadlock_free(s)
    ops = [op for rank in s.ranks for op in rank]
    assert {op.kind for op in ops} == {"F"} and len(ops) == len(set(ops)) == p * v * m
    assert all(op.stage % p == r for r, rank in enumerate(s.ranks) for op in rank)
    sim = sched.simulate(s)
    assert len(sim.spans) == len(ops)


# -- the same law on real engines ----------------------------------------------------------------


ODD_DTYPES = [
    np.dtype([("x", "<f8"), ("n", "<i4"), ("tag", "S3")]),  # a record: its .str is only "|V15"
    np.dtype(">f8"),  # big-endian, as FITS files are
    np.dtype("<M8[ms]"),
    np.dtype("<U4"),
    np.dtype("c16"),
    np.dtype("?"),
]


def odd_array(dtype: np.dtype, rows: int = 1000) -> np.ndarray:
    """``rows`` rows of random bytes, each row 256 bytes or more, as ``dtype``."""
    cols = -(-256 // dtype.itemsize)
    raw = np.random.default_rng(7).integers(0, 256, (rows, cols * dtype.itemsize), np.uint8)
    if dtype.kind == "U":  # valid code points only
        return np.char.mod("%d", raw[:, :cols]).astype(dtype)
    if dtype.kind == "b":
        return raw[:, :cols] % 2 == 1
    return raw.view(dtype)


def native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=")


@pytest.mark.cluster
@pytest.mark.parametrize("transport", ["shm", "direct", "ipp"])
@pytest.mark.parametrize("dtype", ODD_DTYPES, ids=str)
def test_scatter_then_gather_is_the_identity_on_real_engines(pool, transport, dtype):
    import nbparallel

    arr = odd_array(dtype)
    assert arr.nbytes >= 2 * parcel.INLINE_LIMIT  # the shards leave the message
    out = nbparallel.scatter("y = x.copy()\nd = x.dtype", {"x": arr}, gather=["y"],
                             reduce={"d": "list"}, engines=[0, 1], transport=transport, pool=pool)
    # What the cell saw on each engine: the same dtype (pickle may make the byte order native).
    assert [native(d) for d in out["d"]] == [native(dtype)] * 2
    same(out["y"], arr)
    kept = nbparallel.scatter("k = x", {"x": arr}, keep=["k"], engines=[0, 1],
                              transport=transport, pool=pool)["k"]
    assert native(kept.dtype) == native(dtype)
    same(np.asarray(kept), arr)


@pytest.mark.parametrize("make", [
    lambda rng: rng.random(48 << 17),                       # 48 MiB, contiguous: cut flat
    lambda rng: rng.random((4, 3 << 20))[:, 1000:-1000],    # a strided block of a frame
    lambda rng: {"b": rng.integers(0, 9, 5 << 20), "s": rng.random((9, 1 << 19))[::2]},
])
def test_large_writes_copied_on_threads_land_where_the_entries_say(make):
    from nbparallel.dataplane.shm import Segment

    value = make(np.random.default_rng(5))
    layout = parcel.Layout()
    entry = layout.add(value)
    assert layout.nbytes >= parcel.PARALLEL_COPY  # the threaded path, not the one-loop one
    seg = Segment.create(layout.nbytes, "test-threads")
    try:
        layout.write(seg)
        got = parcel.open_entry(entry(seg), lambda name, size, off, n:
                                np.frombuffer(seg.mm, np.uint8, n, off))
        if isinstance(value, dict):
            assert value.keys() == got.keys()
            for k in value:
                np.testing.assert_array_equal(got[k], value[k])
        else:
            np.testing.assert_array_equal(got, value)
        del got
    finally:
        seg.unlink()
        seg.close()
