"""The pure partition layer: no cluster, property tests where a law exists."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nbparallel import partition
from nbparallel.errors import PartitionError, UsageError


@given(rows=st.integers(1, 200), n=st.integers(1, 16))
def test_bounds_match_numpy_array_split(rows, n):
    expected = [len(p) for p in np.array_split(np.arange(rows), n)]
    assert [stop - start for start, stop in partition.bounds(rows, n)] == expected


@given(
    arr=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9)),
    data=st.data(),
)
def test_split_then_join_is_identity_for_arrays(arr, data):
    axis = data.draw(st.integers(-arr.ndim, arr.ndim - 1))
    n = data.draw(st.integers(1, arr.shape[axis]))
    shards = partition.split(arr, n, axis=axis)
    expected = np.array_split(arr, n, axis=axis)
    for shard, exp in zip(shards, expected):
        np.testing.assert_array_equal(shard.value, exp)
    np.testing.assert_array_equal(partition.join([s.value for s in shards], axis % arr.ndim), arr)


@given(items=st.lists(st.integers(), min_size=1, max_size=50), data=st.data())
def test_split_then_join_is_identity_for_lists_and_tuples(items, data):
    n = data.draw(st.integers(1, len(items)))
    assert partition.join([s.value for s in partition.split(items, n)]) == items
    tup = tuple(items)
    assert partition.join([s.value for s in partition.split(tup, n)]) == tup


@given(rows=st.integers(1, 60), data=st.data())
def test_halo_rows_are_the_neighbours_and_trimming_recovers_the_shard(rows, data):
    n = data.draw(st.integers(1, rows))
    k = data.draw(st.integers(0, 5))
    arr = np.arange(rows * 2).reshape(rows, 2)
    shards = partition.split(arr, n, halo=k)
    for shard in shards:
        lo, hi = shard.halo
        assert lo == min(k, shard.start) and hi == min(k, rows - shard.stop)
        np.testing.assert_array_equal(shard.value, arr[shard.start - lo: shard.stop + hi])
    trimmed = [s.value[s.halo[0]: len(s.value) - s.halo[1]] for s in shards]
    np.testing.assert_array_equal(np.concatenate(trimmed), arr)


def test_array_shards_are_views_not_copies():
    arr = np.arange(12.0)
    assert all(np.shares_memory(s.value, arr) for s in partition.split(arr, 3))


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        ({"a": 1}, {}, "cannot be split across engines"),
        (np.float64(3.0), {}, "0-d array"),
        (np.zeros((4, 4)), {"axis": 2}, "--axis 2 is out of range"),
        ([1, 2, 3], {"axis": 1}, "can only be split along axis 0"),
        (np.zeros((0, 3)), {}, "is empty"),
        (np.zeros(2), {}, "has 2 row(s) along axis 0 but the cell would run on 3 engines"),
        (np.zeros(5), {"halo": -1}, "--halo must be 0 or more"),
    ],
)
def test_split_rejects_bad_values_with_clear_messages(value, kwargs, message):
    with pytest.raises(UsageError, match=None) as info:
        partition.split(value, 3, name="x", **kwargs)
    assert message in str(info.value)


def test_join_errors_say_how_to_fix():
    with pytest.raises(PartitionError, match="--reduce s=list"):
        partition.join([np.float64(1), np.float64(2)], name="s")
    with pytest.raises(PartitionError, match="engine 0: array, engine 1: list"):
        partition.join([np.zeros(2), [1]], labels=[0, 1])
    with pytest.raises(PartitionError, match=r"engine 4: \(2, 3\), engine 5: \(2, 4\)"):
        partition.join([np.zeros((2, 3)), np.zeros((2, 4))], labels=[4, 5])
    with pytest.raises(PartitionError, match="only arrays, lists and tuples"):
        partition.join([{"a": 1}, {"b": 2}], name="d")


@pytest.mark.parametrize("op, expected", [("sum", 6), ("prod", 6), ("min", 1), ("max", 3),
                                          ("list", [1, 2, 3])])
def test_reduce_scalars(op, expected):
    assert partition.reduce(op, [1, 2, 3]) == expected


def test_reduce_arrays_elementwise_and_concat():
    vals = [np.array([1, 5]), np.array([4, 2]), np.array([3, 3])]
    np.testing.assert_array_equal(partition.reduce("sum", vals), [8, 10])
    np.testing.assert_array_equal(partition.reduce("max", vals), [4, 5])
    np.testing.assert_array_equal(partition.reduce("min", vals), [1, 2])
    np.testing.assert_array_equal(partition.reduce("concat", vals), [1, 5, 4, 2, 3, 3])


def test_reduce_errors():
    with pytest.raises(UsageError, match="unknown reduce operation 'avg'"):
        partition.reduce("avg", [1, 2], name="s")
    with pytest.raises(PartitionError, match=r"different shapes \(engine 0: \(2,\), engine 1: \(3,\)\)"):
        partition.reduce("sum", [np.zeros(2), np.zeros(3)], name="s")
    with pytest.raises(PartitionError, match="cannot reduce `s` with sum"):
        partition.reduce("sum", [1, "a"], name="s")


@pytest.mark.parametrize("spec, ids", [("0", [0]), ("0-3,6", [0, 1, 2, 3, 6]), (" 1 - 2 , 5 ", [1, 2, 5]),
                                       ("2,2,1", [2, 1])])
def test_parse_engines(spec, ids):
    assert partition.parse_engines(spec) == ids


@pytest.mark.parametrize("spec, message", [("0-", "is not an engine id or a range"),
                                           ("a", "is not an engine id"),
                                           ("__import__('os')", "is not an engine id"),
                                           ("3-1", "runs backwards"), ("", "is not an engine id")])
def test_parse_engines_rejects_malformed(spec, message):
    with pytest.raises(UsageError, match=message):
        partition.parse_engines(spec)
