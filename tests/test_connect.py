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


def test_connect_by_the_profiles_folder_as_ipcluster_start_profile_dir_names_it(ipcluster,
                                                                              tmp_path):
    import nbparallel
    from IPython.paths import get_ipython_dir
    from nbparallel.errors import PoolError

    folder = str(Path(get_ipython_dir()) / "profile_default")
    session = nbparallel.Session(nbparallel.Pool.connect(profile=folder, gpus="none"))
    try:
        assert len(session.ids) == 2
    finally:
        session.stop()
    missing = tmp_path / "profile_elsewhere"
    with pytest.raises(PoolError, match=rf"{missing}/security/ipcontroller-client.json does not "
                                        rf"exist.*ipcluster start -n 4 --profile-dir={missing}"):
        nbparallel.Pool.connect(profile=str(missing))


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


# -- connecting when engines are missing, busy or late --------------------------------------------
def _ipcluster_cmd() -> list[str]:
    return [str(Path(sys.executable).with_name("ipcluster"))]


@pytest.fixture(scope="module")
def empty_cluster():
    """A controller with no engines yet (what a queued batch job looks like), cluster id "empty"."""
    from nbparallel.controller import connection_file
    from nbparallel.ipcluster import controller_down

    subprocess.run([*_ipcluster_cmd(), "start", "-n", "0", "--cluster-id=empty", "--daemonize"],
                   check=True, timeout=120)
    url_file = connection_file(None, "empty")
    deadline = time.monotonic() + 60
    while not (url_file.exists() and controller_down(url_file) is None):
        assert time.monotonic() < deadline, "the controller of the empty cluster did not come up"
        time.sleep(0.5)
    yield url_file
    subprocess.run([*_ipcluster_cmd(), "stop", "--cluster-id=empty"], timeout=120)


def _engine(cluster_id: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ipyparallel.engine", f"--cluster-id={cluster_id}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_connect_to_a_cluster_without_engines_says_what_it_found_and_how_to_wait(empty_cluster):
    from nbparallel.errors import PoolError
    from nbparallel.pool import Pool

    start = time.monotonic()
    with pytest.raises(PoolError, match=r"is running \(its controller answers\) but no engine "
                       r"registered within 5 s.*ipcluster engines -n 4 --cluster-id=empty.*"
                       r"%nbp connect --wait --cluster-id=empty"):
        Pool.connect(cluster_id="empty")
    assert time.monotonic() - start < 10


def test_connect_wait_reports_progress_and_returns_when_the_engines_came(empty_cluster):
    from nbparallel.pool import Pool

    said: list[str] = []
    engine = None
    try:
        def later(line: str) -> None:
            nonlocal engine
            said.append(line)
            if engine is None:
                engine = _engine("empty")  # comes while connect waits

        start = time.monotonic()
        pool = Pool.connect(cluster_id="empty", wait=60, n=1, gpus="none", say=later)
        took = time.monotonic() - start
        try:
            assert len(pool.ids) == 1 and pool.late == []
            assert said[0].startswith("nbparallel: waiting for engines: 0 of 1 registered, 60 s left")
            print(f"\nconnect --wait returned {took:.1f} s after it began, once the engine came")
        finally:
            pool.stop()
    finally:
        if engine is not None:
            engine.kill()
            engine.wait()


def test_connect_wait_times_out_with_what_came(empty_cluster):
    from nbparallel.errors import PoolError
    from nbparallel.pool import Pool

    said: list[str] = []
    with pytest.raises(PoolError, match="no engine registered within 1.5 s"):
        Pool.connect(cluster_id="empty", wait=1.5, n=3, say=said.append)
    assert said and "0 of 3 registered" in said[0]


def test_a_busy_engine_is_reported_and_joins_when_it_answers(ipcluster):
    """Another client keeps engine 1 busy: connect does not wait for it, says so, and the engine
    joins the pool once it answers."""
    import nbparallel
    from nbparallel.pool import PROBE_TIMEOUT, Pool

    busy = ipcluster[1].apply_async(time.sleep, PROBE_TIMEOUT + 4)
    time.sleep(0.5)
    start = time.monotonic()
    pool = Pool.connect(gpus="none")
    try:
        took = time.monotonic() - start
        assert took < 10, took
        assert pool.ids == [0] and pool.late == [1]
        assert "engine(s) 1 did not answer within 5 s (busy" in nbparallel.session.connected(
            nbparallel.Session(pool))
        busy.get(timeout=30)
        deadline = time.monotonic() + 10
        while pool.ids != [0, 1]:
            assert time.monotonic() < deadline, pool.ids
            time.sleep(0.1)
        assert pool.info(1).get("pid") == ipcluster[1].apply_sync(os.getpid)
    finally:
        pool.stop()


def test_the_first_magic_never_starts_a_local_cluster_beside_a_running_default_one(tmp_path):
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    subprocess.run([*_ipcluster_cmd(), "start", "-n", "0", "--daemonize"], check=True, timeout=120,
                   env=env)
    try:
        script = tmp_path / "session.py"
        script.write_text(textwrap.dedent("""
            ip = get_ipython()
            import time
            from nbparallel.controller import connection_file
            from nbparallel.ipcluster import controller_down
            deadline = time.monotonic() + 60
            while not (connection_file(None, None).exists()
                       and controller_down(connection_file(None, None)) is None):
                assert time.monotonic() < deadline
                time.sleep(0.5)
            ip.run_line_magic("load_ext", "nbparallel")
            ip.run_cell("%%pmap x in range(4) -> r\\nx + 1")
            import nbparallel
            print("POOL", nbparallel.session.current())
        """))
        proc = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor",
                               str(script)], capture_output=True, text=True, timeout=180, env=env)
        out = proc.stdout + proc.stderr
        assert "no engine registered within 2 s" in out, out
        assert "does not start a local cluster while the default one runs" in out, out
        assert "started a local cluster" not in out and "POOL None" in out, out
    finally:
        subprocess.run([*_ipcluster_cmd(), "stop"], timeout=120, env=env)


def test_connect_to_a_stopped_controller_or_a_missing_profile_says_so(tmp_path):
    import json
    import socket

    from nbparallel.controller import connection_file
    from nbparallel.errors import PoolError
    from nbparallel.pool import Pool

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening
        stale = connection_file(None, "stale")
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text(json.dumps({"interface": "tcp://127.0.0.1", "registration": port,
                                     "key": "x", "ssh": ""}))
        start = time.monotonic()
        with pytest.raises(PoolError, match=rf"is not running: nothing listens at tcp://127\.0\.0\.1:"
                           rf"{port}.*`ipcluster stop --cluster-id=stale` removes it"):
            Pool.connect(cluster_id="stale")
        assert time.monotonic() - start < 3
        stale.unlink()
    with pytest.raises(PoolError, match=r"There is no IPython profile 'nope' \(the profiles here "
                       r"are: .*default\); `ipcluster start -n 4 --profile=nope` makes it"):
        Pool.connect(profile="nope")


@pytest.mark.parametrize("line, message", [
    ("connect --wait -5", "--wait: takes a number of seconds, 0 or more; not '-5'"),
    ("connect --wait soon", "--wait: takes a number of seconds, 0 or more; not 'soon'"),
    ("connect -n 0", "-n takes a number of engines, 1 or more, not 0"),
])
def test_bad_connect_options_are_usage_errors(ip, line, message):
    from nbparallel.errors import UsageError

    with pytest.raises(UsageError, match=message):
        ip.run_line_magic("nbp", line)
