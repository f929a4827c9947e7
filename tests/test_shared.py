"""Scattering an array that already lives in shared memory copies nothing (real engines)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import nbparallel

pytestmark = pytest.mark.cluster

ROWS = 2_000_000  # 16 MB of float64


def _copied(pool, cursor, kind="scatter"):
    return [r.nbytes for r in pool.transfers.since(cursor)[0] if r.kind == kind and r.direction == "out"]


def test_a_gathered_result_is_scattered_again_without_a_copy(ip, pool):
    ip.user_ns["a"] = np.arange(ROWS, dtype=np.float64)
    ip.run_cell_magic("scatter", "a --gather y", "y = a * 2")
    assert pool.plane.arena.locate(ip.user_ns["y"]) is not None  # it lives in shared memory
    cursor = pool.transfers.cursor
    ip.run_cell_magic("scatter", "y --gather z", "z = y + 1")
    assert _copied(pool, cursor) == [0] * len(pool.ids)  # one record per engine, nothing copied
    np.testing.assert_array_equal(ip.user_ns["z"], np.arange(ROWS) * 2.0 + 1)
    cursor = pool.transfers.cursor
    ip.user_ns["plain"] = np.arange(ROWS, dtype=np.float64)
    ip.run_cell_magic("scatter", "plain --gather w", "w = plain")
    assert sum(_copied(pool, cursor)) == ROWS * 8  # the one copy a plain array costs


def test_what_an_engine_writes_into_its_piece_stays_there(ip, pool):
    ip.user_ns["s"] = nbparallel.asshared(np.ones(ROWS), pool=pool)
    ip.run_cell_magic("scatter", "s --gather t", "s *= -1\nt = s.sum(keepdims=True)")
    assert ip.user_ns["t"].sum() == -ROWS  # the engines saw their own writes
    assert (ip.user_ns["s"] == 1).all()  # the notebook's array did not change
    ip.user_ns["s"][:] = 5  # and what the notebook writes next is what the engines see next
    ip.run_cell_magic("scatter", "s --gather t", "t = s.sum(keepdims=True)")
    assert ip.user_ns["t"].sum() == 5 * ROWS


def test_shared_arrays_are_zeroed_scatter_and_broadcast_without_a_copy(ip, pool):
    a = nbparallel.shared((ROWS // 4, 4), np.float32, pool=pool)
    assert a.shape == (ROWS // 4, 4) and a.dtype == np.float32 and not a.any()
    a[:] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    b = nbparallel.shared(1 << 18, pool=pool)  # 2 MB, broadcast read-only
    b[:] = 3.0
    ip.user_ns.update(a=a, b=b)
    cursor = pool.transfers.cursor
    ip.run_cell_magic("scatter", "a --broadcast b --gather c",
                      "assert not b.flags.writeable\nc = a * b[0]")
    none = [0] * len(pool.ids)
    assert _copied(pool, cursor) == none and _copied(pool, cursor, "broadcast") == none
    np.testing.assert_array_equal(ip.user_ns["c"], a * 3)
    assert nbparallel.asshared(a, pool=pool) is a  # already there: no second copy


def test_pieces_that_are_not_contiguous_are_copied_as_before(ip, pool):
    ip.user_ns["m"] = nbparallel.shared((ROWS // 8, 8), pool=pool)
    cursor = pool.transfers.cursor
    ip.run_cell_magic("scatter", "m --axis 1 --gather n", "n = m")
    assert sum(_copied(pool, cursor)) == ROWS * 8


def test_the_memory_of_a_shared_array_is_free_once_it_is_gone(ip, pool):
    arena = pool.plane.arena
    a = nbparallel.shared(ROWS, pool=pool)
    name = arena.locate(a)[0].name
    ip.user_ns["a"] = a
    ip.run_cell_magic("scatter", "a --gather r", "r = a[:1]")
    assert arena.leased() == []  # no lease outlives the cell
    del a, ip.user_ns["a"], ip.user_ns["r"]
    gc.collect()
    arena._reclaim()
    assert arena._entries[name].state == "free"  # the arena may lease it again
    again = nbparallel.shared(ROWS, pool=pool)
    assert not again.any()  # whichever segment it got, zeroed


def test_too_big_for_the_budget_is_a_clear_error(pool):
    with pytest.raises(nbparallel.UsageError, match=r"do not fit in the pool's shared memory .*"
                       r"NBPARALLEL_SHM_BUDGET"):
        nbparallel.shared(1 << 50, np.uint8, pool=pool)
