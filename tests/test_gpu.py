"""GPU engines: binding each engine to a device, ``%nbp status`` and NVML metrics, device residence.

Three kinds of test:

* pure: parsing ``--gpus``, the round-robin plan, UUIDs, the NVML reader (with a stand-in module);
* cluster, on any machine: real engines with a stand-in ``cupy`` package (two fake devices, see
  ``FAKE_CUPY``) and a stand-in ``pynvml`` that numbers devices in the opposite order to CUDA, so
  binding, ``%nbp status`` and the monitor's samples are checked end to end, and matching by index
  instead of UUID would show; and the guarantee that importing nbparallel or running CPU magics
  never imports CuPy (checked in fresh processes, where an import would leave a mark);
* ``gpu``: the same on real devices with real CuPy, skipped where CuPy finds no device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from nbparallel import gpu
from nbparallel.errors import UsageError
from nbparallel.pool import EngineInfo


# -- pure: --gpus, the plan ----------------------------------------------------------------------
@pytest.mark.parametrize("spec, want", [
    (None, None), ("all", "all"), (" ALL ", "all"), ("none", "none"), ("cpu", "none"),
    ("0", (0,)), ("0,1", (0, 1)), ("2-4,0", (2, 3, 4, 0)), ("1,1", (1,)), ([3, 1], (3, 1)),
])
def test_parse_gpus(spec, want):
    assert gpu.parse_gpus(spec) == want


@pytest.mark.parametrize("spec", ["", "some", "0;1", "-1", "3-1", "1.5", [], [-1], [True], ["0"]])
def test_parse_gpus_refuses_what_it_cannot_read(spec):
    with pytest.raises(UsageError):
        gpu.parse_gpus(spec)


def test_assign_is_round_robin_over_the_chosen_devices():
    assert gpu.assign([0, 1, 2, 3], [0, 1]) == [0, 1, 0, 1]
    assert gpu.assign([0, 1, 2], [2, 5]) == [2, 5, 2]
    assert gpu.assign([3], [0, 1]) == [1]
    assert gpu.assign([0, 1], []) == [None, None]
    assert gpu.assign([], [0]) == []


def test_local_ranks_count_engines_per_host():
    assert gpu.local_ranks(["a", "b", "a", "b", "a"]) == [0, 0, 1, 1, 2]
    assert gpu.local_ranks([]) == []


def test_plan_default_uses_every_visible_device_silently():
    engines = [(0, "h", [0, 1]), (1, "h", [0, 1]), (2, "h", [0, 1])]
    assert gpu.plan(None, engines) == ({0: 0, 1: 1, 2: 0}, None)
    assert gpu.plan("all", engines) == ({0: 0, 1: 1, 2: 0}, None)


def test_plan_ranks_are_per_host_and_in_engine_order():
    engines = [(3, "b", [0, 1]), (0, "a", [0, 1]), (1, "b", [0, 1]), (2, "a", [0, 1])]
    choice, _ = gpu.plan("all", engines)
    assert choice == {0: 0, 2: 1, 1: 0, 3: 1}


def test_plan_without_devices_binds_nothing_and_says_so_only_when_asked():
    engines = [(0, "h", []), (1, "h", [])]
    assert gpu.plan(None, engines) == ({0: None, 1: None}, None)
    choice, note = gpu.plan("all", engines)
    assert choice == {0: None, 1: None}
    assert note and "no engine sees a CUDA device" in note and "\n" not in note
    assert gpu.plan("none", [(0, "h", [0, 1])]) == ({0: None}, None)


def test_plan_with_device_numbers():
    engines = [(0, "h", [0, 1, 2]), (1, "h", [0, 1, 2]), (2, "h", [0, 1, 2])]
    assert gpu.plan((2,), engines)[0] == {0: 2, 1: 2, 2: 2}
    assert gpu.plan((2, 0), engines)[0] == {0: 2, 1: 0, 2: 2}


def test_plan_refuses_devices_an_engine_does_not_see():
    with pytest.raises(UsageError, match=r"engine 1 on h2 sees CUDA device 0, so it cannot use "
                                         r"device 1"):
        gpu.plan((0, 1), [(0, "h1", [0, 1]), (1, "h2", [0])])
    with pytest.raises(UsageError, match="sees no CUDA device"):
        gpu.plan((0,), [(0, "h", [])])


def test_plan_with_one_device_per_engine_gives_each_its_own():
    # A launcher that sets CUDA_VISIBLE_DEVICES per engine: every engine sees one device, as 0.
    engines = [(0, "h", [0]), (1, "h", [0]), (2, "h", [0])]
    assert gpu.plan("all", engines)[0] == {0: 0, 1: 0, 2: 0}


# -- pure: UUIDs, NVML, the status table ---------------------------------------------------------
def test_uuid_string():
    raw = bytes.fromhex("8ecd2b7a4f3a1c9e0d5b6a7f8e9d0c1b")
    assert gpu.uuid_string(raw) == "GPU-8ecd2b7a-4f3a-1c9e-0d5b-6a7f8e9d0c1b"
    assert gpu.uuid_string(raw + b"junk") == gpu.uuid_string(raw)  # read past a missing NUL
    assert gpu.uuid_string(raw[:5]) is None  # cut short at a zero byte: identifies nothing
    assert gpu.uuid_string(bytes(16)) is None
    assert gpu.uuid_string(None) is None
    assert gpu.uuid_string("GPU-abc") == "GPU-abc" and gpu.uuid_string("MIG-x") == "MIG-x"


def _fake_pynvml(uuids: dict[str, int], pcis: dict[str, int] | None = None) -> types.ModuleType:
    """A pynvml stand-in that knows the devices by UUID (and PCI bus id), counting lookups."""
    mod = types.ModuleType("pynvml")
    mod.calls = {"uuid": 0, "pci": 0, "init": 0, "shutdown": 0}

    def by(table, kind):
        def get(ident):
            mod.calls[kind] += 1
            ident = ident.decode() if isinstance(ident, bytes) else ident
            if ident not in table:
                raise RuntimeError("NVML_ERROR_NOT_FOUND")
            return ("handle", table[ident])
        return get

    mod.nvmlInit = lambda: mod.calls.__setitem__("init", mod.calls["init"] + 1)
    mod.nvmlShutdown = lambda: mod.calls.__setitem__("shutdown", mod.calls["shutdown"] + 1)
    mod.nvmlDeviceGetHandleByUUID = by(uuids, "uuid")
    mod.nvmlDeviceGetHandleByPciBusId = by(pcis or {}, "pci")
    mod.nvmlDeviceGetName = lambda h: f"NVML GPU {h[1]}".encode()
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=(h[1] + 1) << 30, used=(h[1] + 1) << 20, free=0)
    mod.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=10 * (h[1] + 1),
                                                                        memory=0)
    return mod


def test_nvml_reads_metrics_by_uuid_and_caches_handles(monkeypatch):
    fake = _fake_pynvml({"GPU-a": 0, "GPU-b": 1}, {"0000:02:00.0": 7})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nv = gpu.Nvml()
    assert nv.ok
    b = {"index": 0, "uuid": "GPU-b", "pci": "0000:01:00.0"}
    for _ in range(3):
        assert nv.metrics(b) == (20.0, 2 << 20, 2 << 30)
    assert nv.name(b) == "NVML GPU 1"
    assert fake.calls["uuid"] == 1  # one lookup, then the cached handle
    # No usable UUID (CuPy cut it short): the PCI bus id finds the device instead.
    assert nv.metrics({"uuid": None, "pci": "0000:02:00.0"}) == (80.0, 8 << 20, 8 << 30)
    assert nv.metrics({"uuid": "GPU-gone", "pci": None}) == (None, None, None)
    nv.close()
    assert fake.calls["shutdown"] == 1 and not nv.ok


def test_nvml_without_pynvml_or_driver_answers_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    nv = gpu.Nvml()
    assert not nv.ok
    assert nv.metrics({"uuid": "GPU-a"}) == (None, None, None)
    assert nv.name({"uuid": "GPU-a"}) is None
    broken = types.ModuleType("pynvml")

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert gpu.Nvml().metrics({"uuid": "GPU-a"}) == (None, None, None)


class _StubPool:
    def __init__(self, rows):
        self.rows = rows

    def status(self):
        return self.rows

    def __repr__(self):
        return "<stub pool>"


def test_status_table_cpu_only_has_no_gpu_column():
    from nbparallel.magics import _status_table

    table = _status_table(_StubPool([EngineInfo(0, "h", 11, "cpu", False)]))
    assert "GPU memory" not in table
    assert table.splitlines()[3].split() == ["0", "h", "11", "cpu", "idle"]


def test_status_table_shows_device_name_and_memory():
    from nbparallel.magics import _status_table

    table = _status_table(_StubPool([
        EngineInfo(0, "h", 11, "cuda:1 NVIDIA H200", True, "GPU-b", 3 << 30, 141 << 30),
        EngineInfo(1, "h2", 12, "cuda:0 NVIDIA H200", False, "GPU-c", None, 141 << 30),
        EngineInfo(2, "h", 13, "cpu", False),
    ]))
    lines = table.splitlines()
    assert "GPU memory used / total" in lines[1]
    assert "cuda:1 NVIDIA H200" in lines[3] and lines[3].endswith("3.0 GiB / 141 GiB")
    assert lines[4].endswith("? / 141 GiB")  # another host: NVML here cannot see it
    assert lines[5].split()[3:] == ["cpu", "idle", "-"]


def test_gpu_module_doctests():
    import doctest

    assert doctest.testmod(gpu).failed == 0


def test_cpu_engine_binding_never_imports_cupy(monkeypatch):
    """``bind(None)`` and the xp of a CPU-bound engine do not even look for CuPy."""
    monkeypatch.setattr(gpu, "_binding", gpu._UNBOUND)
    monkeypatch.setattr(gpu, "_cupy", lambda: pytest.fail("CuPy was looked up"))
    assert gpu.bind(None) is None
    assert gpu.array_module() is np and gpu.device_name() == "cpu" and gpu.bound() is None
    values = {"a": np.ones(3)}
    assert gpu.to_device(values) is values


# -- cluster: real engines, stand-in CuPy and NVML -----------------------------------------------
#: A ``cupy`` stand-in: NBP_FAKE_CUPY_DEVICES fake devices; leaves a file named after the pid of
#: every process that imports it in NBP_FAKE_CUPY_MARKS.
FAKE_CUPY = '''
import os, types
_marks = os.environ.get("NBP_FAKE_CUPY_MARKS")
if _marks:
    open(os.path.join(_marks, str(os.getpid())), "w").close()
_N = int(os.environ.get("NBP_FAKE_CUPY_DEVICES", "0"))
_current = [0]

def _props(k):
    if not 0 <= k < _N:
        raise RuntimeError("cudaErrorInvalidDevice")
    return {"name": ("Fake GPU %d" % k).encode(), "uuid": bytes([0xA0 + k] * 16),
            "totalGlobalMem": (k + 1) << 30}

class Device:
    def __init__(self, k=None):
        self.id = _current[0] if k is None else k
    def use(self):
        _props(self.id)
        _current[0] = self.id

runtime = types.SimpleNamespace(
    getDeviceCount=lambda: _N, getDeviceProperties=_props, getDevice=lambda: _current[0],
    deviceGetPCIBusId=lambda k: "0000:%02X:00.0" % (k + 1))
cuda = types.SimpleNamespace(runtime=runtime, Device=Device)
'''

#: A ``pynvml`` stand-in for the same devices, numbered the other way round (NVML index i is CUDA
#: device N-1-i), found only by UUID.
FAKE_PYNVML = '''
import os, types
_N = int(os.environ.get("NBP_FAKE_CUPY_DEVICES", "0"))
_UUIDS = {"GPU-" + "-".join(h[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))
          : k for k, h in ((k, bytes([0xA0 + k] * 16).hex()) for k in range(_N))}
class NVMLError(Exception):
    pass
def nvmlInit():
    pass
def nvmlShutdown():
    pass
def nvmlDeviceGetHandleByIndex(i):
    return _N - 1 - i
def nvmlDeviceGetHandleByUUID(uuid):
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    if uuid not in _UUIDS:
        raise NVMLError("Not Found")
    return _UUIDS[uuid]
def nvmlDeviceGetHandleByPciBusId(pci):
    raise NVMLError("Not Found")
def nvmlDeviceGetName(h):
    return "NVML GPU %d" % h
def nvmlDeviceGetMemoryInfo(h):
    return types.SimpleNamespace(total=(h + 1) << 30, used=(h + 1) << 20, free=0)
def nvmlDeviceGetUtilizationRates(h):
    return types.SimpleNamespace(gpu=10.0 * (h + 1), memory=0)
'''


@pytest.fixture
def fake_env(tmp_path):
    """Environment for a fresh IPython whose engines find the stand-in cupy and pynvml."""
    site = tmp_path / "site"
    (site / "cupy").mkdir(parents=True)
    (site / "cupy" / "__init__.py").write_text(FAKE_CUPY)
    (site / "pynvml.py").write_text(FAKE_PYNVML)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["NBP_FAKE_CUPY_MARKS"] = str(marks)
    env["NBP_FAKE_CUPY_DEVICES"] = "2"
    return env, marks


def _ipython(code: str, tmp_path: Path, env: dict[str, str]) -> str:
    script = tmp_path / "session.py"
    script.write_text("ip = get_ipython()\n" + textwrap.dedent(code))
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", str(script)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.cluster
def test_cpu_magics_never_import_cupy(fake_env, tmp_path):
    """With CuPy importable and devices present: `import nbparallel` and a %%scatter and %%pmap on
    `--gpus none` engines import CuPy nowhere, neither in the notebook nor on an engine."""
    env, marks = fake_env
    out = _ipython("""
        import sys
        import numpy as np
        import nbparallel
        print("AFTER-IMPORT", "cupy" in sys.modules, "pynvml" in sys.modules)
        ip.run_line_magic("load_ext", "nbparallel")
        ip.run_line_magic("nbp", "start -n 2 --gpus none")
        a = np.arange(10.0)
        ip.run_cell("%%scatter a --gather b --reduce kinds=list\\nb = a * 2\\n"
                    "kinds = xp.__name__")
        ip.run_cell("%%pmap x in range(10) -> r\\nx + 1")
        print("RESULT", np.array_equal(b, a * 2), kinds, r == list(range(1, 11)))
        ip.run_line_magic("nbp", "status")
        ip.run_cell("%%scatter --reduce has=list\\nimport sys\\nhas = 'cupy' in sys.modules")
        print("ENGINES", has)
        print("NOTEBOOK", "cupy" in sys.modules, "pynvml" in sys.modules)
        ip.run_line_magic("nbp", "stop")
    """, tmp_path, env)
    assert "AFTER-IMPORT False False" in out
    assert "RESULT True ['numpy', 'numpy'] True" in out
    assert "ENGINES [False, False]" in out
    assert "NOTEBOOK False False" in out
    assert "GPU memory" not in out and " cpu " in out
    assert list(marks.iterdir()) == [], "some process imported cupy"


@pytest.mark.cluster
def test_default_pool_keeps_cupy_out_of_the_notebook(tmp_path):
    """The real environment (CuPy or not, GPU or not): the default pool and a %%scatter never
    import CuPy into the notebook process; on a machine without CuPy nor into the engines."""
    out = _ipython("""
        import sys, importlib.util
        import numpy as np
        ip.run_line_magic("load_ext", "nbparallel")
        ip.run_line_magic("nbp", "start -n 2")
        a = np.arange(10.0)
        ip.run_cell("%%scatter a --gather b --reduce has=list\\nimport sys\\n"
                    "b = a * 2\\nhas = 'cupy' in sys.modules")
        print("RESULT", np.array_equal(b, a * 2), "cupy" in sys.modules,
              importlib.util.find_spec("cupy") is None and any(has))
        ip.run_line_magic("nbp", "stop")
    """, tmp_path, os.environ.copy())
    assert "RESULT True False False" in out


@pytest.mark.cluster
def test_engines_bind_round_robin_and_status_matches_nvml_by_uuid(fake_env, tmp_path):
    env, marks = fake_env
    out = _ipython("""
        import sys, time
        import nbparallel
        ip.run_line_magic("load_ext", "nbparallel")
        ip.run_line_magic("nbp", "start -n 3")
        pool = nbparallel.current()
        print("BOUND", [pool.info(e)["gpu"]["index"] for e in pool.ids])
        print("UUIDS", [pool.info(e)["gpu"]["uuid"][:8] for e in pool.ids])
        ip.run_cell("%%scatter --reduce cur=list\\ncur = xp.cuda.runtime.getDevice()")
        print("CURRENT", cur)
        ip.run_line_magic("nbp", "status")
        pool.monitor.sample(force=True)
        time.sleep(0.1)
        pool.monitor.sample(force=True)
        latest = {s.engine: s for s in pool.monitor.samples.since(0)[0]}
        print("SAMPLES", sorted((e, s.gpu_util, s.gpu_mem, s.gpu_mem_total)
                                for e, s in latest.items()))
        print("NOTEBOOK-CUPY", "cupy" in sys.modules)
        ip.run_line_magic("nbp", "start -n 2 --gpus 1")
        print("ONE", [nbparallel.current().info(e)["gpu"]["index"] for e in nbparallel.current().ids])
        try:
            ip.run_line_magic("nbp", "start -n 2 --gpus 0,5")
        except nbparallel.UsageError as exc:
            print("REFUSED", exc)
        print("STILL", nbparallel.current() is not None and len(nbparallel.current().ids))
        ip.run_line_magic("nbp", "stop")
    """, tmp_path, env)
    assert "BOUND [0, 1, 0]" in out
    assert "UUIDS ['GPU-a0a0', 'GPU-a1a1', 'GPU-a0a0']" in out
    assert "CURRENT [0, 1, 0]" in out
    assert "GPUs: engine 0 cuda:0, engine 1 cuda:1, engine 2 cuda:0" in out
    # NVML numbers the devices the other way round; found by UUID, the names still agree.
    status = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [row[3:7] for row in status] == [["cuda:0", "NVML", "GPU", "0"],
                                            ["cuda:1", "NVML", "GPU", "1"],
                                            ["cuda:0", "NVML", "GPU", "0"]]
    # The last column is how many messages each engine's channel refused (none here).
    assert [" ".join(row[-6:-1]) for row in status] == [
        "1.0 MiB / 1.0 GiB", "2.0 MiB / 2.0 GiB", "1.0 MiB / 1.0 GiB"]
    assert [row[-1] for row in status] == ["0", "0", "0"]
    assert "SAMPLES [(0, 10.0, 1048576, 1073741824), (1, 20.0, 2097152, 2147483648), " \
           "(2, 10.0, 1048576, 1073741824)]" in out
    assert "NOTEBOOK-CUPY False" in out
    assert "ONE [1, 1]" in out
    assert "REFUSED --gpus 0,5: engine 0 on" in out and "cannot use device 5" in out
    assert "STILL 2" in out  # the refused start left the previous pool current
    assert sorted(int(p.name) for p in marks.iterdir()), "engines should have imported cupy"


# -- gpu: real devices (the `cuda` fixture is in conftest.py) -------------------------------------
@pytest.mark.gpu
@pytest.mark.cluster
def test_each_engine_uses_the_device_it_was_assigned(cuda, ip, pool):
    ranks = gpu.local_ranks([pool.info(e)["host"] for e in pool.ids])
    want = gpu.assign(ranks, list(range(cuda.cuda.runtime.getDeviceCount())))
    assert [pool.info(e)["gpu"]["index"] for e in pool.ids] == want
    ip.run_cell("%%scatter --reduce devs=list\n"
                "d = xp.cuda.runtime.getDevice()\n"
                "devs = (int(d), xp.cuda.runtime.getDeviceProperties(d)['uuid'])").raise_error()
    devs = ip.user_ns["devs"]
    assert [d for d, _ in devs] == want
    assert [gpu.uuid_string(u) for _, u in devs] == [pool.info(e)["gpu"]["uuid"] for e in pool.ids]
    rows = pool.status()
    assert all(r.device.startswith(f"cuda:{k} ") for r, k in zip(rows, want))
    assert all(r.gpu_mem_total and r.gpu_mem_total > 0 for r in rows)


@pytest.mark.gpu
@pytest.mark.cluster
def test_shards_live_on_the_device_and_come_back_as_numpy(cuda, ip):
    a = np.arange(300_000, dtype=np.float64)
    ip.user_ns.update(a=a, v=np.ones(4))
    ip.run_cell("%%scatter a --broadcast v --gather b --reduce kinds=list\n"
                "kinds = (type(a).__module__.split('.')[0], type(v).__module__.split('.')[0],\n"
                "         xp.__name__)\n"
                "b = a * 2 + v.sum()").raise_error()
    assert ip.user_ns["kinds"] == [("cupy", "cupy", "cupy")] * len(ip.user_ns["kinds"])
    b = ip.user_ns["b"]
    assert type(b) is np.ndarray and np.array_equal(b, a * 2 + 4)


STENCIL = r'''
extern "C" __global__ void laplace5(const double* p, double* out, int h, int w) {
    int i = blockIdx.y * blockDim.y + threadIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= h || j >= w) return;
    int W = w + 2;                                   // p is padded by one on every side
    const double* c = p + (i + 1) * W + (j + 1);
    out[i * w + j] = c[-W] + c[W] + c[-1] + c[1] - 4.0 * c[0];
}
'''


def _laplace_numpy(p):
    h, w = p.shape[0] - 2, p.shape[1] - 2
    c = p[1:h + 1, 1:w + 1]
    return p[0:h, 1:w + 1] + p[2:h + 2, 1:w + 1] + p[1:h + 1, 0:w] + p[1:h + 1, 2:w + 2] - 4.0 * c


@pytest.mark.gpu
@pytest.mark.cluster
def test_rawkernel_stencil_over_halo_shards_equals_numpy(cuda, ip):
    img = np.random.default_rng(0).random((513, 257))
    ip.user_ns.update(img=img, src=STENCIL)
    ip.run_cell("%%scatter img --halo 1 --gather out\n"
                "kern = xp.RawKernel(src, 'laplace5', options=('--fmad=false',))\n"
                "p = xp.pad(xp.asarray(img), 1, mode='edge')\n"
                "h, w = img.shape\n"
                "res = xp.empty((h, w))\n"
                "kern(((w + 15) // 16, (h + 15) // 16), (16, 16), (p, res, xp.int32(h), xp.int32(w)))\n"
                "lo, hi = halo\n"
                "out = res[lo:h - hi]").raise_error()
    want = _laplace_numpy(np.pad(img, 1, mode="edge"))
    assert np.array_equal(ip.user_ns["out"], want)
