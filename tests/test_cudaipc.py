"""CUDA IPC between GPU engines of one host (dataplane/cudaipc.py), and the bench's gpu group.

* pure: taking device arrays out of a value and putting them back; the message mark.
* cluster, no GPU: the gpu bench group says why it did not run; a CuPy-free pool never takes the
  IPC path.
* ``gpu``: the same on real devices with real CuPy, skipped where CuPy finds no device: a slot
  reused only once the receiver's arrays are gone, pipeline activations and a notebook CuPy
  array moved device to device, and the performance goals of issue 6 (at least 50% of the
  device's own copy speed for an IPC hop and for a stencil over device shards).
"""

from __future__ import annotations

import doctest
import gc
import pickle

import numpy as np
import pytest

from nbparallel import bench
from nbparallel.dataplane import cudaipc, handoff, parcel


def is_array(obj):
    return isinstance(obj, np.ndarray)


# -- pure ------------------------------------------------------------------------------------------
def test_split_takes_the_arrays_out_and_join_puts_them_back():
    a, b = np.arange(100_000.0), np.ones((3, 4), dtype=np.int8)
    value = {"x": a, "pair": (b, "label", 3), "nested": [a, {"deep": b}]}
    skeleton, arrays = cudaipc.split(value, is_array)
    assert len(arrays) == 2  # each array once, however often it appears
    assert len(skeleton) < 400  # the bytes are not in it
    back = cudaipc.join(skeleton, arrays)
    assert back["x"] is arrays[0] and back["nested"][0] is back["x"]
    assert back["pair"][1:] == ("label", 3) and back["nested"][1]["deep"] is back["pair"][0]


def test_a_value_without_device_arrays_splits_into_nothing():
    skeleton, arrays = cudaipc.split([1, "two", 3.0], is_array)
    assert arrays == [] and cudaipc.join(skeleton, arrays) == [1, "two", 3.0]


def test_the_ipc_mark_is_told_apart_from_every_other_header():
    header, _ = parcel.dumps({"x": np.ones(10)})
    ipc = cudaipc.MARK + pickle.dumps(("n", 1, b"h", 1, "bus", [], b""))
    assert cudaipc.is_ipc(ipc) and not handoff.is_handoff(ipc)
    assert not cudaipc.is_ipc(header) and not cudaipc.is_ipc(handoff.MARK + b"rest")


def test_module_doctests():
    assert doctest.testmod(cudaipc).failed == 0


# -- cluster, no GPU -------------------------------------------------------------------------------
@pytest.mark.cluster
def test_the_gpu_bench_group_says_why_it_did_not_run_on_cpu_engines(pool):
    if any(pool.info(e).get("gpu") for e in pool.ids):
        pytest.skip("these engines have GPUs: the gpu tests below cover them")
    report = bench.run(pool, only=["gpu"], size_mb=8, repeat=1)
    rows = report["cases"]
    assert {(r["name"], r["what"]) for r in rows} == {
        (bench.NB, bench.HOP), (bench.NB, "stencil"),
        ("cupy device-to-device copy", bench.HOP), ("cupy device-to-device copy", "stencil")}
    assert all("needs two engines of this host bound to GPUs" in r["error"] for r in rows)
    assert all(v["value"] is None for v in report["ratios"].values())
    assert "gpu" not in bench.DEFAULT_GROUPS


# -- gpu: real devices (the `cuda` fixture is in conftest.py) -------------------------------------
@pytest.mark.gpu
def test_a_slot_is_reused_only_once_the_receivers_arrays_are_gone(cuda):
    cp = cuda
    box = cudaipc.DeviceOutbox(cp, "test-ipc")
    try:
        x = cp.arange(1 << 18, dtype=cp.float64)  # 2 MB
        note, nbytes = box.pack({"x": x, "tag": "a"})
        assert nbytes == x.nbytes and len(box.slots) == 1
        got = cudaipc.receive(cp, note)  # this process's own slot: the same-engine path
        assert got["tag"] == "a" and bool((got["x"] == x).all())
        slot = box.slots[0]
        assert slot.flag.mm[0] == cudaipc.BUSY
        box.pack({"y": x})  # the first slot is still read: a second one
        assert len(box.slots) == 2
        del got
        gc.collect()
        assert slot.flag.mm[0] == cudaipc.FREE
        assert box.pack({"z": x}) is not None and len(box.slots) == 2  # reused, not a third
        assert box.pack({"small": cp.ones(8)}) is None  # below the threshold: the host path
    finally:
        box.close()


@pytest.mark.gpu
@pytest.mark.cluster
def test_pipeline_activations_go_device_to_device(cuda, ip, pool):
    gpus = [e for e in pool.ids if pool.info(e).get("gpu")]
    if len(gpus) < 2:
        pytest.skip("needs two engines bound to GPUs")
    ip.run_cell_magic("stage", f"g0 --engine {gpus[0]}",
                      "def forward(x, ctx):\n    return xp.asarray(x) * 2\n")
    ip.run_cell_magic("stage", f"g1 --engine {gpus[1]}",
                      "def forward(x, ctx):\n"
                      "    assert type(x).__module__.startswith('cupy'), type(x)\n"
                      "    return x + 1\n")
    xs = np.random.default_rng(0).standard_normal((4, 1 << 20))  # 8 MB a micro-batch
    ip.user_ns["xs"] = xs
    cursor = pool.transfers.cursor
    try:
        ip.run_line_magic("pipeline", "run --input xs --microbatches 4 --out ys --no-dashboard")
        assert type(ip.user_ns["ys"]) is np.ndarray
        np.testing.assert_array_equal(ip.user_ns["ys"], xs * 2 + 1)
        stage = [t for t in pool.transfers.since(cursor)[0] if t.kind == "stage"]
        assert {t.transport for t in stage} == {"cuda-ipc"}
        assert sum(t.nbytes for t in stage) == xs.nbytes
    finally:
        pool.pipeline.clear()


@pytest.mark.gpu
@pytest.mark.cluster
def test_a_cupy_array_in_the_notebook_is_scattered_device_to_device(cuda, ip, pool):
    if not all(pool.info(e).get("gpu") for e in pool.ids):
        pytest.skip("needs every engine bound to a GPU")
    a = cuda.arange(3 * (1 << 18), dtype=cuda.float64)  # 6 MB
    ip.user_ns["a"] = a
    cursor = pool.transfers.cursor
    ip.run_cell_magic("scatter", "a --gather b --reduce kinds=list --no-dashboard",
                      "kinds = type(a).__module__.split('.')[0]\nb = a * 2")
    assert ip.user_ns["kinds"] == ["cupy"] * len(pool.ids)
    np.testing.assert_array_equal(ip.user_ns["b"], cuda.asnumpy(a) * 2)
    sent = {t.transport for t in pool.transfers.since(cursor)[0] if t.kind == "scatter"}
    assert sent == {"cuda-ipc"}


@pytest.mark.gpu
@pytest.mark.cluster
def test_ipc_hop_and_stencil_reach_half_the_device_copy_speed(cuda, pool, capsys):
    report = bench.run(pool, only=["gpu"], size_mb=256, repeat=3)
    with capsys.disabled():
        print("\n" + bench.format_table(report))
    rows = report["cases"]
    assert not [r for r in rows if r["error"]], rows
    ratios = report["ratios"]
    hop = ratios[f"gpu {bench.HOP}: nbparallel GB/s as % of cupy device-to-device copy"]
    stencil = ratios["gpu stencil: nbparallel GB/s as % of cupy device-to-device copy"]
    assert hop["value"] >= 50, hop
    assert stencil["value"] >= 50, stencil
