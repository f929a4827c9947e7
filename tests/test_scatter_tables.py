"""%%scatter over pandas, Arrow and xarray values on real engines, against the libraries' own
results: split, gather, reduce, keep, the --by shuffle, and bad input that binds nothing."""

import numpy as np
import pytest

import nbparallel
from nbparallel.errors import NbparallelError, UsageError

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
xr = pytest.importorskip("xarray")

pytestmark = pytest.mark.cluster


def trips(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "zone": pd.Categorical(rng.choice([f"z{i}" for i in range(40)], n)),
        "driver": rng.choice(["ann", "bo", "cy", None], n),
        "km": rng.gamma(2.0, 3.0, n),
        "fare": rng.gamma(2.0, 8.0, n).round(2),
        "start": pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 86_400 * 30, n), "s"),
        "tags": pd.Series([["a"] * (i % 3) for i in range(n)], dtype=object),
    }, index=pd.RangeIndex(1000, 1000 + n, name="trip"))


def test_frame_scatter_gather_keeps_index_dtypes_and_rows(ip):
    df = trips(5_003)
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", "df --gather out --reduce n=list",
                      "out = df.assign(per_km=df.fare / df.km)\nn = (rank, len(df), df.index[0])")
    pd.testing.assert_frame_equal(ip.user_ns["out"], df.assign(per_km=df.fare / df.km))
    assert ip.user_ns["n"] == [(0, 1668, 1000), (1, 1668, 2668), (2, 1667, 4336)]


def test_large_frame_columns_go_through_shared_memory_both_ways(ip, pool):
    rng = np.random.default_rng(1)
    df = pd.DataFrame({f"c{i}": rng.random(400_000) for i in range(4)})
    df["when"] = pd.date_range("2020", periods=len(df), freq="s")
    ip.user_ns["df"] = df
    cursor = pool.transfers.cursor
    ip.run_cell_magic("scatter", "df --gather out --engines 0-1", "out = df")
    pd.testing.assert_frame_equal(ip.user_ns["out"], df)
    moved, _ = pool.transfers.since(cursor)
    shm = [t for t in moved if t.transport == "shm"]
    assert {t.direction for t in shm} == {"in", "out"}
    assert sum(t.nbytes for t in shm if t.direction == "in") >= df.memory_usage().sum()


@pytest.mark.parametrize("transport", ["direct", "ipp"])
def test_frames_over_every_transport(ip, transport):
    df = trips(30_000)
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", f"df --gather out --transport {transport} --engines 0-1",
                      "out = df[df.km > 2]")
    pd.testing.assert_frame_equal(ip.user_ns["out"], df[df.km > 2])


def test_by_puts_each_key_on_one_engine_so_groupby_is_complete(ip):
    df = trips(20_000)
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", "df --by zone --gather per_zone --reduce zones=list",
                      "per_zone = df.groupby('zone', observed=True).agg(km=('km', 'sum'), n=('fare', 'size'))\n"
                      "zones = set(df.zone.astype(str))")
    zones = ip.user_ns["zones"]
    assert sum(len(z) for z in zones) == 40 == len(set().union(*zones))
    got = ip.user_ns["per_zone"].sort_index()
    want = df.groupby("zone", observed=True).agg(km=("km", "sum"), n=("fare", "size"))
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12)


def test_reduce_partial_aggregates_equals_pandas_on_the_whole(ip):
    df = trips(9_000)
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", "df --reduce total=sum longest=max",
                      "total = df.groupby('driver').fare.sum()\nlongest = df.groupby('driver').km.max()")
    pd.testing.assert_series_equal(ip.user_ns["total"], df.groupby("driver").fare.sum(), rtol=1e-12)
    pd.testing.assert_series_equal(ip.user_ns["longest"], df.groupby("driver").km.max())


def test_keep_a_frame_then_scatter_the_handle(ip):
    df = trips(3_000)
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", "df --keep clean", "clean = df.dropna()")
    handle = ip.user_ns["clean"]
    assert isinstance(handle, nbparallel.Resident)
    pd.testing.assert_frame_equal(handle.gather(), df.dropna())
    ip.run_cell_magic("scatter", "clean --by driver --gather n", "n = clean.groupby('driver').size()")
    pd.testing.assert_series_equal(ip.user_ns["n"].sort_index(), df.dropna().groupby("driver").size())


def test_arrow_tables_split_and_join(ip):
    tab = pa.Table.from_pandas(trips(7_000)[["km", "fare", "driver"]], preserve_index=False)
    ip.user_ns["tab"] = tab
    ip.run_cell_magic("scatter", "tab --gather out",
                      "import pyarrow.compute as pc\nout = tab.filter(pc.greater(tab['km'], 3))")
    import pyarrow.compute as pc
    assert ip.user_ns["out"].equals(tab.filter(pc.greater(tab["km"], 3)))
    ip.run_cell_magic("scatter", "tab --by driver --reduce keys=list",
                      "keys = set(tab.column('driver').to_pylist())")
    keys = ip.user_ns["keys"]
    assert sum(map(len, keys)) == len(set().union(*keys))


def test_xarray_along_a_named_dimension(ip):
    temps = xr.DataArray(np.random.default_rng(2).random((3, 240)), dims=("site", "time"),
                         coords={"time": pd.date_range("2026", periods=240, freq="h")},
                         name="temp", attrs={"units": "K"})
    ip.user_ns["temps"] = temps
    ip.run_cell_magic("scatter", "temps --axis time --gather anomaly --reduce top=max",
                      "anomaly = temps - 0.5\ntop = temps.max('time')")
    xr.testing.assert_identical(ip.user_ns["anomaly"], temps - 0.5)
    xr.testing.assert_allclose(ip.user_ns["top"], temps.max("time"))


def test_python_twin_takes_by_and_a_dimension_name():
    df = trips(4_000)
    out = nbparallel.scatter("n = df.groupby('driver').size()", {"df": df}, by="driver",
                             reduce={"n": "sum"})
    pd.testing.assert_series_equal(out["n"], df.groupby("driver").size())


@pytest.mark.parametrize("line, message", [
    ("df --by nope --gather out", "no scattered table has a column 'nope'"),
    ("s --by v --gather out", "`s` is a Series"),
    ("df --by zone --halo 1 --gather out", "--halo and --by zone do not go together"),
    ("df --axis 1 --gather out", "splits by rows only"),
    ("temps --axis nope --gather out", "has no dimension 'nope'"),
    ("d --gather out", "scatter list(d.items())"),
])
def test_bad_input_binds_nothing(ip, line, message):
    df = trips(100)
    ip.user_ns.update(df=df, s=df["km"], d={"a": 1}, out="untouched",
                      temps=xr.DataArray(np.ones(4), dims="time"))
    with pytest.raises(NbparallelError) as info:
        ip.run_cell_magic("scatter", line, "out = 1")
    assert message in str(info.value)
    assert ip.user_ns["out"] == "untouched"


def test_a_skewed_key_says_so(ip, capsys):
    df = pd.DataFrame({"k": ["hot"] * 9_000 + [f"c{i}" for i in range(1_000)], "v": 1.0})
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", "df --by k --engines 0-1 --reduce n=sum", "n = len(df)")
    assert ip.user_ns["n"] == 10_000
    assert "--by k put" in capsys.readouterr().out


def test_pmap_over_groupby_and_itertuples(ip):
    df = trips(600)
    ip.user_ns["df"] = df
    ip.run_cell_magic("pmap", "key, group in df.groupby('driver') -> sums", "(key, group.fare.sum())")
    assert dict(ip.user_ns["sums"]) == pytest.approx(df.groupby("driver").fare.sum().to_dict())
    ip.run_cell_magic("pmap", "row in df.itertuples() -> kms", "row.km")
    assert ip.user_ns["kms"] == list(df.km)


def test_unpicklable_item_named_before_running(ip):
    import threading
    ip.user_ns["items"] = [1, threading.Lock()]
    with pytest.raises(UsageError, match="item 1"):
        ip.run_cell_magic("pmap", "x in items -> out", "x")


def test_a_kept_by_result_is_used_in_place_not_split_again(ip, pool):
    df = trips(8_000)
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", "df --by driver --keep parts", "parts = df")
    handle = ip.user_ns["parts"]
    assert handle.is_table and handle.length == 8_000 and "8,000 rows of DataFrame" in repr(handle)
    cursor = pool.transfers.cursor
    ip.run_cell_magic("scatter", "parts --reduce keys=list", "keys = set(parts.driver.dropna())")
    keys = ip.user_ns["keys"]
    assert sum(map(len, keys)) == len(set().union(*keys)) == 3  # still one engine per key
    moved, _ = pool.transfers.since(cursor)
    assert sum(t.nbytes for t in moved if t.direction == "out" and t.kind != "names") < 10_000


def test_gathered_numeric_frames_are_written_by_the_engines_into_the_joined_columns(ip, pool):
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"a": rng.random(300_000), "b": rng.integers(0, 9, 300_000),
                       "when": pd.date_range("2020", periods=300_000, freq="s")})
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", "df --gather whole part --engines 0-1",
                      "whole = df\npart = df[df.a > 0.5]")
    whole, part = ip.user_ns["whole"], ip.user_ns["part"]
    pd.testing.assert_frame_equal(whole, df)
    pd.testing.assert_frame_equal(part, df[df.a > 0.5])  # an index of values, not a range
    assert type(whole.index).__name__ == "RangeIndex"
    # No concat in the notebook: the columns are views of one shared-memory segment.
    assert not whole["a"].to_numpy().flags.owndata
    leased = len(pool.plane.arena._entries)
    del whole, part
    ip.user_ns.pop("whole"), ip.user_ns.pop("part")
    import gc
    gc.collect()
    pool.plane.arena._reclaim()  # what the next lease does first
    states = [e.state for e in pool.plane.arena._entries.values()]
    assert len(states) <= leased and "lent" not in states


def test_a_kept_frame_explains_the_segments_it_reads(ip, pool):
    """So the engine does not run the cycle collector (tens of ms) after every later cell."""
    rng = np.random.default_rng(4)
    df = pd.DataFrame({"a": rng.random(200_000), "s": pd.array(rng.choice(["x", "y"], 200_000),
                                                                   dtype="str")})
    ip.user_ns["df"] = df
    ip.run_cell_magic("scatter", "df --keep kept --engines 0-1", "kept = df")
    ip.run_cell_magic("scatter", "--engines 0-1 --reduce alive=list unexplained=list",
                      "from nbparallel.dataplane import remote\n"
                      "alive = remote._alive()\n"
                      "unexplained = sorted(set(alive) - remote._explained())")
    assert all(ip.user_ns["alive"]) and ip.user_ns["unexplained"] == [[], []]
    pd.testing.assert_frame_equal(ip.user_ns["kept"].gather(), df)
