"""The pure table layer (tables.py via partition): pandas, Arrow and xarray split, joined and
reduced as their own libraries would, with no cluster."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbparallel import partition, tables
from nbparallel.dataplane import parcel
from nbparallel.errors import PartitionError, UsageError

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
xr = pytest.importorskip("xarray")


def frame(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "k": rng.integers(0, 7, n),
        "v": rng.random(n),
        "w": rng.random(n),
        "s": rng.choice(["a", "bb", None], n),
        "o": pd.Series([("x", i) for i in range(n)], dtype=object),
        "c": pd.Categorical(rng.choice(["p", "q", "r"], n)),
        "t": pd.date_range("2020-01-01", periods=n, freq="min", tz="Europe/Paris"),
        "d": pd.to_timedelta(rng.integers(0, 100, n), unit="s"),
    }, index=pd.Index([f"r{i}" for i in range(n)], name="row"))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 60), data=st.data())
def test_split_then_join_is_identity_for_frames_series_and_tables(rows, data):
    n = data.draw(st.integers(1, rows))
    df = frame(rows)
    shards = partition.split(df, n, name="df")
    assert [len(s.value) for s in shards] == [len(p) for p in np.array_split(np.arange(rows), n)]
    pd.testing.assert_frame_equal(partition.join([s.value for s in shards], 0, "df"), df)
    ser = df["v"]
    pd.testing.assert_series_equal(partition.join([s.value for s in partition.split(ser, n)]), ser)
    tab = pa.Table.from_pandas(df[["k", "v", "s"]])
    assert partition.join([s.value for s in partition.split(tab, n)]).equals(tab)


def test_non_unique_index_splits_by_position():
    df = pd.DataFrame({"v": range(6)}, index=[1, 1, 1, 2, 2, 2])
    parts = [s.value for s in partition.split(df, 2)]
    assert [list(p["v"]) for p in parts] == [[0, 1, 2], [3, 4, 5]]
    pd.testing.assert_frame_equal(partition.join(parts), df)


def test_xarray_splits_along_a_named_or_numbered_dimension():
    da = xr.DataArray(np.arange(24.).reshape(4, 6), dims=("x", "time"),
                      coords={"time": pd.date_range("2021", periods=6), "x": list("abcd")},
                      attrs={"units": "K"})
    for axis in ("time", 1, -1):
        parts = [s.value for s in partition.split(da, 4, axis=axis)]
        assert [p.sizes["time"] for p in parts] == [2, 2, 1, 1]
        xr.testing.assert_identical(partition.join(parts, axis), da)
    ds = xr.Dataset({"a": da, "b": ("time", np.arange(6))})
    parts = [s.value for s in partition.split(ds, 2, axis="time")]
    xr.testing.assert_identical(partition.join(parts, "time"), ds)
    total = partition.reduce("sum", [da, da], name="da")
    xr.testing.assert_identical(total, da + da)


def test_reduce_frames_aligns_on_the_index_as_pandas_groupby_does():
    df = frame(500)
    parts = [s.value for s in partition.split(df, 3)]
    partial = [p.groupby("k").v.sum() for p in parts]  # not every engine has every key
    pd.testing.assert_series_equal(partition.reduce("sum", partial, name="s"),
                                   df.groupby("k").v.sum())
    for op in ("min", "max"):
        got = partition.reduce(op, [getattr(p.groupby("k")[["v", "w"]], op)() for p in parts])
        pd.testing.assert_frame_equal(got, getattr(df.groupby("k")[["v", "w"]], op)())
    assert partition.reduce("concat", parts).equals(df)
    assert len(partition.reduce("list", parts)) == 3


def test_by_key_puts_every_key_on_one_engine_stably_and_keeps_row_order():
    df = frame(2000)
    df.loc[df.index[::97], "k"] = -1
    positions, owner = tables.by_key({"df": df}, "k", 3)
    assert owner == "df" and sorted(np.concatenate(positions)) == list(range(2000))
    keys = [set(df["k"].iloc[p]) for p in positions]
    assert sum(len(k) for k in keys) == len(set(df["k"]))  # no key on two engines
    assert all(np.all(np.diff(p) > 0) for p in positions)  # original order within an engine
    again, _ = tables.by_key({"df": df.copy()}, "k", 3)
    assert all(np.array_equal(a, b) for a, b in zip(positions, again))
    # A categorical key hashes by value: the same rows whatever the categories' order.
    cat = df.assign(c=df["c"].cat.reorder_categories(["r", "q", "p"]))
    assert all(np.array_equal(a, b) for a, b in
               zip(tables.by_key({"df": df}, "c", 2)[0], tables.by_key({"df": cat}, "c", 2)[0]))


def test_by_key_nan_keys_land_together():
    df = pd.DataFrame({"k": [1.0, np.nan, 2.0, np.nan, np.nan], "v": range(5)})
    positions, _ = tables.by_key({"df": df}, "k", 2)
    with_nan = [p for p in positions if df["k"].iloc[p].isna().any()]
    assert len(with_nan) == 1 and df["k"].iloc[with_nan[0]].isna().sum() == 3


def test_by_key_on_arrow_tables_and_a_skew_note():
    tab = pa.table({"k": ["a"] * 900 + ["b"] * 100, "v": np.arange(1000)})
    positions, _ = tables.by_key({"t": tab}, "k", 2)
    counts = sorted(len(p) for p in positions)
    assert counts in ([100, 900], [0, 1000])
    note = tables.skew_note([900, 100], [0, 1], "k")
    assert "900 of 1,000 rows (90%) on engine 0" in note
    assert tables.skew_note([510, 490], [0, 1], "k") is None


@pytest.mark.parametrize("call, message", [
    (lambda df: tables.by_key({"df": df}, "nope", 2), "no scattered table has a column 'nope'"),
    (lambda df: tables.by_key({"s": df["v"]}, "v", 2), "`s` is a Series"),
    (lambda df: partition.split(df, 2, axis=1, name="df"), "splits by rows only"),
    (lambda df: partition.split(df, 2, axis="time", name="df"), "splits by rows only"),
    (lambda df: partition.split(xr.DataArray(np.ones(3), dims="x"), 2, axis="y", name="da"),
     "has no dimension 'y'; its dimensions are 'x'"),
    (lambda df: partition.split({"a": 1}, 2, name="d"), "scatter list(d.items())"),
    (lambda df: partition.split("text", 2, name="s"), "A string is one value"),
    (lambda df: partition.join([df, df[["v"]]], 0, "out"), "different columns"),
    (lambda df: partition.join([df, df["v"]], 0, "out"), "different kinds of value"),
    (lambda df: partition.reduce("sum", [pa.table({"a": [1]})] * 2, name="t"), "Arrow tables"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises((PartitionError, UsageError), match=message.replace("(", r"\(").replace(")", r"\)")):
        call(frame(10))


def test_shard_columns_leave_the_pickle_stream():
    """A row slice of a frame (strided blocks, datetimes) travels as buffers, not in the stream."""
    df = frame(50_000)
    header, buffers = parcel.dumps(df.iloc[10_000:30_000])
    numeric = sum(parcel.buffer_nbytes(b) for b in buffers)
    assert numeric >= 20_000 * 8 * 4  # v, w, t and d at least
    assert len(header) < 20_000 * 30  # the object column's tuples are all that stays inline
    back = parcel.loads(header, [bytearray(parcel.raw(b)) for b in buffers])
    pd.testing.assert_frame_equal(back, df.iloc[10_000:30_000])


def test_tables_are_recognised_by_module_without_importing_them():
    class DataFrame:  # a namesake from another library is not a pandas frame
        shape, dtype = (3,), np.float64
    assert tables.kind(DataFrame()) is None
    assert tables.kind(frame(3)) == "DataFrame" and tables.kind(frame(3)["v"]) == "Series"
    assert not partition._is_array(frame(3)["v"])  # a Series keeps its index
