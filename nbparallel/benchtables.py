"""The ``tables`` group of ``nbparallel bench``: pandas DataFrames through ``%%scatter``, beside
``DataFrame.copy()`` (the memory ceiling of one direction) and Dask, in the same run.

What each row times (best and median of ``repeat``, after a checked warm-up):

* ``numeric scatter`` / ``numeric gather`` / ``numeric round trip``: a frame of ``size_mb`` MB
  (four float64 columns and one int64 column) scattered over the engines and kept there
  (``keep=``), then gathered back (``Resident.gather()``). ``DataFrame.copy`` copies the frame one
  way and the copy back, the ceiling of each direction (reported as a percentage). ``dask``:
  ``dd.from_pandas(df, npartitions=n).map_partitions(identity).compute()`` on a local cluster of
  ``n`` worker processes, timed as a round trip. (Dask hands the string column back as its
  ``string`` dtype, pandas.NA for missing values, not the ``str`` it was: the check compares
  values there, not dtypes.)
* ``mixed round trip``: the same with a third of the bytes in a string column (pandas' default
  string dtype), scattered and gathered in one cell.
* ``shuffle``: ``min(10 million, size_mb MB / 16 B)`` rows of an int64 key (10,000 keys) and a
  float64 value, hash-partitioned onto the engines and kept there: ``scatter(by="k",
  keep=...)`` against Dask's ``from_pandas(...).shuffle(on="k")`` persisted on its workers.

Without pandas (the ``nbparallel[tables]`` extra) the group says so; without Dask (the
``nbparallel[bench]`` extra) the Dask rows do.
"""

from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

import nbparallel

from .benchkit import MB, NB, Trial, measure, ready

if TYPE_CHECKING:
    from .session import Session

__all__ = ["WHATS", "COPY", "group"]

NUMERIC = ("numeric scatter", "numeric gather", "numeric round trip")
MIXED = "mixed round trip"
SHUFFLE = "shuffle"
WHATS = (*NUMERIC, MIXED, SHUFFLE)
COPY = "DataFrame.copy"  #: the ceiling row, as numpy.copyto is for arrays
SHUFFLE_ROWS = 10_000_000
KEYS = 10_000


def group(pool: Session, size_mb: int, repeat: int, say: Callable[[str], None],
          dask_client: Callable[[int], Any] | None) -> list[dict[str, Any]]:
    """The rows of the ``tables`` group; ``dask_client(n)`` opens a local Dask client (None:
    Dask is not installed)."""
    try:
        pd = importlib.import_module("pandas")
    except ImportError:
        return (measure("tables", NB, WHATS, None, repeat, say)
                + measure("tables", COPY, WHATS[:3], None, repeat, say))
    n = len(pool.ids)
    num, mixed, shuf = _frames(pd, size_mb)
    sizes = {w: _nbytes(num) * (2 if "round" in w else 1) for w in NUMERIC}
    sizes[MIXED] = 2 * _nbytes(mixed)
    sizes[SHUFFLE] = _nbytes(shuf)

    def keep() -> Any:
        return nbparallel.scatter("", {"df": num}, keep=["df"], pool=pool)["df"]

    def one_cell() -> Any:
        return nbparallel.scatter("out = df", {"df": mixed}, gather=["out"], pool=pool)["out"]

    def by_key() -> Any:
        return nbparallel.scatter("", {"df": shuf}, by="k", keep=["df"], pool=pool)["df"]

    def placed(handle: Any) -> None:  # every key on one engine: the shuffle did its job
        keys = nbparallel.scatter("keys = set(df.k.unique())", {"df": handle},
                                  reduce={"keys": "list"}, pool=pool)["keys"]
        if sum(map(len, keys)) != len(set().union(*keys)) or sum(map(len, keys)) != KEYS:
            raise RuntimeError("a key landed on two engines: the shuffle is broken")

    def free(handle: Any) -> None:
        handle.free()

    rows = measure("tables", NB, NUMERIC, ready(_frame_split(pd, keep, num, free)),
                   repeat, say, nbytes=sizes)
    rows += measure("tables", NB, [MIXED], ready(_timed(pd, MIXED, one_cell, mixed)),
                    repeat, say, nbytes=sizes)
    rows += measure("tables", NB, [SHUFFLE],
                    ready(_timed(pd, SHUFFLE, by_key, None, placed, free)), repeat, say,
                    nbytes=sizes)
    rows += measure("tables", COPY, NUMERIC, ready(_copies(pd, num)), repeat, say,
                    nbytes=sizes)
    rows += measure("tables", "dask", ["numeric round trip", MIXED, SHUFFLE],
                    (lambda: _dask(pd, dask_client, n, num, mixed, shuf)) if dask_client else None,
                    repeat, say, nbytes=sizes)
    return rows


def _frames(pd: Any, size_mb: int) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(0)
    rows = max(size_mb * MB // 40, 16)  # five 8-byte columns
    num = pd.DataFrame({**{f"f{i}": rng.random(rows) for i in range(4)},
                        "i": rng.integers(0, 1 << 40, rows)})
    words = np.array([f"w{i:05d}" for i in range(1000)], dtype=object)  # 6-byte strings
    mixed = pd.DataFrame({"f": rng.random(rows // 2), "i": rng.integers(0, 99, rows // 2),
                          "s": pd.array(words[rng.integers(0, 1000, rows // 2)], dtype="str")})
    count = min(SHUFFLE_ROWS, max(size_mb * MB // 16, KEYS * 2))
    shuf = pd.DataFrame({"k": rng.integers(0, KEYS, count), "v": rng.random(count)})
    shuf.loc[:KEYS - 1, "k"] = np.arange(KEYS)  # every key present, so the check can count them
    return num, mixed, shuf


def _nbytes(df: Any) -> int:
    return int(df.memory_usage(index=False, deep=False).sum())


def _same(pd: Any, got: Any, want: Any, dtypes: bool = True) -> None:
    try:
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True),
                                      check_dtype=dtypes)
    except AssertionError as exc:
        raise RuntimeError(f"the frame came back different: the benchmarked path is broken "
                           f"({str(exc).splitlines()[0]})") from None


def _frame_split(pd: Any, put: Callable[[], Any], want: Any, free: Callable[[Any], None]) -> Trial:
    def trial(check: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        handle = put()
        t1 = time.perf_counter()
        try:
            back = handle.gather()
            t2 = time.perf_counter()
            if check:
                _same(pd, back, want)
        finally:
            free(handle)
        return {NUMERIC[0]: t1 - t0, NUMERIC[1]: t2 - t1, NUMERIC[2]: t2 - t0}
    return trial


def _timed(pd: Any, what: str, fn: Callable[[], Any], want: Any,
           verify: Callable[[Any], None] = lambda _: None,
           after: Callable[[Any], None] = lambda _: None) -> Trial:
    def trial(check: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        got = fn()
        took = time.perf_counter() - t0
        try:
            if check:
                if want is not None:
                    _same(pd, got, want)
                verify(got)
        finally:
            after(got)
        return {what: took}
    return trial


def _copies(pd: Any, num: Any) -> Trial:
    def trial(check: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        there = num.copy()
        t1 = time.perf_counter()
        back = there.copy()
        t2 = time.perf_counter()
        if check:
            _same(pd, back, num)
        return {NUMERIC[0]: t1 - t0, NUMERIC[1]: t2 - t1, NUMERIC[2]: t2 - t0}
    return trial


@contextmanager
def _dask(pd: Any, dask_client: Callable[[int], Any], n: int, num: Any, mixed: Any,
          shuf: Any) -> Iterator[Trial]:
    dd = importlib.import_module("dask.dataframe")
    from distributed import wait

    with dask_client(n) as client:
        def round_trip(df: Any) -> Any:
            return dd.from_pandas(df, npartitions=n).map_partitions(lambda d: d).compute()

        def shuffle() -> Any:
            done = client.persist(dd.from_pandas(shuf, npartitions=n).shuffle(on="k", npartitions=n))
            wait(done)
            return done

        def trial(check: bool) -> dict[str, float]:
            t0 = time.perf_counter()
            back = round_trip(num)
            t1 = time.perf_counter()
            back_mixed = round_trip(mixed)
            t2 = time.perf_counter()
            shuffled = shuffle()
            t3 = time.perf_counter()
            if check:
                _same(pd, back, num)
                _same(pd, back_mixed, mixed, dtypes=False)  # Dask makes "str" its "string"
                if int(shuffled.map_partitions(len).compute().sum()) != len(shuf):
                    raise RuntimeError("Dask's shuffle lost rows")
            del shuffled
            return {"numeric round trip": t1 - t0, MIXED: t2 - t1, SHUFFLE: t3 - t2}
        yield trial
