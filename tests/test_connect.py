"""A cluster launched with `ipcluster start --daemonize`, used from separate IPython processes."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def _ipython(code: str, tmp_path) -> str:
    script = tmp_path / "session.py"
    script.write_text("ip = get_ipython()\n" + textwrap.dedent(code))
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", str(script)],
        capture_output=True, text=True, timeout=180, env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def ipcluster():
    """`ipcluster start -n 2 --daemonize` on the default profile of the tests' IPython dir."""
    import ipyparallel as ipp

    ipcluster = [str(Path(sys.executable).with_name("ipcluster"))]
    subprocess.run([*ipcluster, "start", "-n", "2", "--daemonize"], check=True, timeout=120)
    deadline = time.monotonic() + 120
    client = None
    while time.monotonic() < deadline:
        try:
            client = ipp.Client(timeout=5)
            client.wait_for_engines(2, timeout=60, interactive=False)
            break
        except Exception:
            time.sleep(1)
    assert client is not None and len(client.ids) == 2, "ipcluster did not come up"
    yield client
    client.close()
    subprocess.run([*ipcluster, "stop"], timeout=120)


def test_nbp_connect_runs_magics_on_the_ipcluster_and_leaves_it_running(ipcluster, tmp_path):
    out = _ipython("""
        ip.run_line_magic("load_ext", "nbparallel")
        ip.run_line_magic("nbp", "connect")
        ip.run_line_magic("nbp", "status")
        import numpy as np
        a = np.arange(10.0)
        ip.run_cell("%%scatter a --gather b --reduce n=sum\\nb = a * 2\\nn = len(a)")
        print("RESULT", np.array_equal(b, a * 2), n)
        ip.run_line_magic("nbp", "stop")
    """, tmp_path)
    assert "connected to 2 engines" in out
    assert "RESULT True 10" in out
    assert "disconnected" in out
    assert len(ipcluster.ids) == 2  # %nbp stop never stops a cluster it only connected to


def test_first_magic_without_a_pool_connects_to_the_running_default_cluster(ipcluster, tmp_path):
    out = _ipython("""
        ip.run_line_magic("load_ext", "nbparallel")
        ip.run_cell("%%pmap x in range(100) -> r\\nx + 1")
        print("RESULT", r == list(range(1, 101)))
    """, tmp_path)
    assert "connected to the running default cluster (2 engines)" in out
    assert "RESULT True" in out


def test_connected_engines_share_the_cores_among_their_blas_threads(ipcluster, tmp_path):
    """Engines ipcluster started get the rule too, at connect: narrowed where they run."""
    from nbparallel.cores import usable_cores

    out = _ipython("""
        ip.run_line_magic("load_ext", "nbparallel")
        ip.run_line_magic("nbp", "connect")
        ip.run_cell("%%scatter --reduce pools=list\\n"
                    "import threadpoolctl\\n"
                    "pools = sorted((p['internal_api'], p['num_threads']) "
                    "for p in threadpoolctl.threadpool_info())")
        print("POOLS", pools)
        ip.run_line_magic("nbp", "stop")
    """, tmp_path)
    line = next(x for x in out.splitlines() if x.startswith("POOLS"))
    pools = eval(line[len("POOLS "):])  # our own print of a list of (str, int) pairs
    want = int(os.environ.get("OPENBLAS_NUM_THREADS") or max(1, usable_cores() // 2))
    assert len(pools) == 2 and all(pools), pools  # NumPy's OpenBLAS seen on both engines
    assert {n for engine in pools for _, n in engine} == {want}, pools


def test_started_engines_share_the_cores_among_their_blas_threads(pool) -> None:
    import os

    want = os.environ.get("OPENBLAS_NUM_THREADS") or str(max(1, (os.cpu_count() or 1)
                                                            // len(pool.ids)))
    got = {pool.pool.apply(e, os.getenv, "OPENBLAS_NUM_THREADS").get(timeout=30) for e in pool.ids}
    assert got == {want}


def test_default_engine_count_follows_the_cores_this_process_may_use() -> None:
    code = ("import os; os.sched_setaffinity(0, {0}); "
            "from nbparallel.pool import usable_cores; print(usable_cores())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1", out.stderr
