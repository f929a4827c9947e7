"""Engines started by `ipcluster start --engines=slurm`: a batch job of a real, one-node Slurm
(Debian's slurm-wlm with its own munged, set up by tests/slurmkit.py in a temporary directory),
reached with `%nbp connect --wait`. Skipped without slurm-wlm and munge or without root, except
under CI=true, where .ci/run installs both and a skip would hide a broken launcher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import nbparallel
from nbparallel import ipcluster as ipc
from nbparallel import pipeline
from nbparallel.controller import connection_file
from nbparallel.errors import PoolError

import slurmkit
from test_pipeline import STAGE  # one linear layer a stage, tanh but on the last

pytestmark = pytest.mark.cluster

#: What a user writes into the profile's ipcluster_config.py (the README's recipe).
IPCLUSTER_CONFIG = """\
c = get_config()
c.Cluster.engine_launcher_class = "slurm"     # what --engines=slurm says
c.SlurmEngineSetLauncher.queue = "debug"      # #SBATCH --partition=debug
c.SlurmEngineSetLauncher.timelimit = "10"     # #SBATCH --time=10 (minutes): a lost job ends
"""
CONNECT_WAIT = 120  # seconds %nbp connect --wait gives the job's engines
#: A profile of its own, in the tests' throwaway IPython dir (conftest.py): `%nbp connect` finds a
#: cluster by profile name and cluster id, not by a --profile-dir.
PROFILE = f"nbpslurm{os.getpid()}"


def _ipcluster(slurm: slurmkit.Slurm, *args: str, timeout: float = 120, check: bool = True):
    # cwd: ipcluster writes the batch script (slurm_engine.sbatch) into its working directory.
    return subprocess.run([str(Path(sys.executable).with_name("ipcluster")), *args],
                          cwd=slurm.dir, env=slurm.env, timeout=timeout, check=check,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)


def _start_cluster(slurm, profile: str, cid: str, *extra: str) -> str:
    """`ipcluster start -n 2 --engines=slurm --daemonize`; returns the job id once the controller
    answers (its engines may still be queued)."""
    try:
        _ipcluster(slurm, "start", "-n", "2", "--engines=slurm", f"--profile={profile}",
                   f"--cluster-id={cid}", "--daemonize", *extra)
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"ipcluster start failed:\n{exc.stdout}\n{exc.stderr}") from None
    url_file = connection_file(profile, cid)
    deadline = time.monotonic() + 60
    while not (url_file.exists() and ipc.controller_down(url_file) is None
               and ipc.launched(profile, cid).jobs):
        assert time.monotonic() < deadline, (
            f"the controller of {cid} did not come up, or its cluster file names no job\n"
            + slurm.log_tails())
        time.sleep(0.25)
    [(scheduler, job)] = ipc.launched(profile, cid).jobs
    assert scheduler == "slurm"
    return job


def _stop_cluster(slurm, profile: str, cid: str, job: str | None = None) -> None:
    """`ipcluster stop`; with ``job``, check that it cancelled that job (scancel, by
    ipyparallel's launcher) within 30 s."""
    out = _ipcluster(slurm, "stop", f"--profile={profile}", f"--cluster-id={cid}", timeout=60,
                     check=False)
    if job is None:
        return
    deadline = time.monotonic() + 30
    while job in slurm.jobs():
        assert time.monotonic() < deadline, (f"`ipcluster stop` left Slurm job {job} "
                                             f"{slurm.jobs()[job]}:\n{out.stdout}{out.stderr}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def slurm():
    missing = slurmkit.missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(".ci/run installs slurm-wlm and munge: the Slurm launcher must be "
                        f"tested (missing: {', '.join(missing)})")
        pytest.skip(f"needs Debian's slurm-wlm and munge (missing: {', '.join(missing)})")
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm runs its daemons and jobs as root")
    kit = slurmkit.Slurm(cpus=4)
    profile_dir = connection_file(PROFILE, None).parent.parent
    try:
        kit.start()
        profile_dir.mkdir(parents=True, exist_ok=True)
        (profile_dir / "ipcluster_config.py").write_text(IPCLUSTER_CONFIG)
        # The notebook's side asks squeue for the job's state: it needs the same slurm.conf.
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(kit.conf))
            yield kit
    finally:
        swept = kit.stop()
        if swept:
            print(f"\nkilled what outlived the jobs and daemons: {swept}")
        shutil.rmtree(profile_dir, ignore_errors=True)
        left = kit.ours()
        assert not left, f"processes outlived the Slurm tests: {left}"


@pytest.fixture(scope="module")
def slurm_cluster(slurm):
    """A cluster whose two engines are one Slurm job, connected to with `--wait`, as
    ``(session, job id, what connect said, seconds it took)``."""
    cid = f"slurm{os.getpid()}"
    session, job = None, None
    try:
        job = _start_cluster(slurm, PROFILE, cid)
        said: list[str] = []
        t0 = time.monotonic()
        pool = nbparallel.Pool.connect(PROFILE, cid, wait=CONNECT_WAIT, gpus="none",
                                       say=said.append)
        took = time.monotonic() - t0
        session = nbparallel.Session(pool)
        yield session, job, said, took
    finally:
        if session is not None:
            session.stop()
        _stop_cluster(slurm, PROFILE, cid, job)


def test_connect_wait_returns_with_the_engines_of_the_slurm_job(slurm_cluster):
    session, job, said, took = slurm_cluster
    print(f"\nconnect --wait: {took:.1f} s for the job's 2 engines; it said {said}")
    # With --wait and no -n, it waits for as many as ipcluster launched (the cluster file says
    # 2), not for the first, and names the job while it waits (unless the engines were quicker
    # than the connect, which they are not here: they take seconds to start).
    assert len(session.ids) == 2 and session.pool.connect_note is None
    assert all(line.startswith("nbparallel: waiting for engines: ") and " of 2 registered "
               f"(Slurm job {job}: " in line for line in said), said
    # The engines are the two tasks of that job, started by srun.
    out = nbparallel.scatter("import os\nj = os.environ['SLURM_JOB_ID']\n"
                             "p = int(os.environ['SLURM_PROCID'])", {},
                             reduce={"j": "list", "p": "list"}, pool=session, echo=lambda s: None)
    assert out["j"] == [job, job] and sorted(out["p"]) == [0, 1]


def test_scatter_on_slurm_engines_agrees_with_numpy(slurm_cluster):
    session = slurm_cluster[0]
    a = np.random.default_rng(0).standard_normal((1001, 3))
    out = nbparallel.scatter("b = np.sin(a) * k\ns = float(a.sum())\nn = len(a)",
                             {"a": a}, broadcast={"k": 3.0}, gather=["b"],
                             reduce={"s": "sum", "n": "list"}, namespace={"np": np},
                             pool=session, echo=lambda s: None)
    np.testing.assert_allclose(out["b"], np.sin(a) * 3.0, rtol=1e-12)
    assert out["s"] == pytest.approx(a.sum())
    assert sorted(out["n"]) == [500, 501]


def test_pmap_on_slurm_engines(slurm_cluster):
    session = slurm_cluster[0]
    got = nbparallel.pmap("import os\n(x * x, os.environ['SLURM_PROCID'])", "x", range(200),
                          pool=session, show_progress=False, echo=lambda s: None)
    assert [v for v, _ in got] == [x * x for x in range(200)]
    assert {p for _, p in got} <= {"0", "1"}


N, LR, STEPS = 16, 0.1, 3


def _one_process(params, x, t):
    """The two layers unsplit, full batch: the losses and the trained weights."""
    (W0, b0), (W1, b1) = [(W.copy(), b.copy()) for W, b in params]
    losses = []
    for _ in range(STEPS):
        h = np.tanh(x @ W0 + b0)
        d = h @ W1 + b1 - t
        losses.append(0.5 * float((d * d).sum()) / N)
        g1 = d / N
        g0 = (g1 @ W1.T) * (1 - h ** 2)
        gW1, gb1, gW0, gb0 = h.T @ g1, g1.sum(0), x.T @ g0, g0.sum(0)
        W1 -= LR * gW1
        b1 -= LR * gb1
        W0 -= LR * gW0
        b0 -= LR * gb0
    return losses, [(W0, b0), (W1, b1)]


def test_two_stage_pipeline_on_slurm_engines_trains_like_one_process(slurm_cluster):
    session = slurm_cluster[0]
    rng = np.random.default_rng(3)
    sizes = [5, 8, 2]
    params = [(rng.standard_normal((i, o)) / np.sqrt(i), rng.standard_normal(o) * 0.1)
              for i, o in zip(sizes, sizes[1:])]
    x, t = rng.standard_normal((N, sizes[0])), rng.standard_normal((N, sizes[-1]))
    session.pipeline.clear()
    for k, ((W, b), engine) in enumerate(zip(params, session.ids)):
        pipeline.stage(f"s{k}", STAGE, engine=engine, pool=session,
                       namespace={"np": np, "W_init": W, "b_init": b, "act": k == 0, "N": N,
                                  "lr": LR})
    try:
        losses = pipeline.train(x, t, 4, schedule="1f1b", steps=STEPS, pool=session)
        want_losses, want = _one_process(params, x, t)
        np.testing.assert_allclose(losses, want_losses, rtol=1e-9)
        for k, (W, b) in enumerate(want):
            np.testing.assert_allclose(session.pipeline.pull(f"s{k}", "W"), W, rtol=1e-9)
            np.testing.assert_allclose(session.pipeline.pull(f"s{k}", "b"), b, rtol=1e-9)
    finally:
        session.pipeline.clear()


def test_a_queued_slurm_job_is_reported_pending_and_connect_wait_takes_its_engines(slurm):
    """The job goes to the partition "held", which is down: it stays PENDING until the test
    brings the partition up while `%nbp connect --wait` waits."""
    from IPython.core.interactiveshell import InteractiveShell

    cid = f"slurmq{os.getpid()}"
    session, stopped = None, False
    try:
        job = _start_cluster(slurm, PROFILE, cid, "--SlurmEngineSetLauncher.queue=held")
        assert slurm.jobs().get(job) == "PENDING"
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "nbparallel")
        t0 = time.monotonic()
        with pytest.raises(PoolError) as info:
            ip.run_line_magic("nbp", f"connect --profile {PROFILE} --cluster-id {cid}")
        took = time.monotonic() - t0
        print(f"\n%nbp connect without --wait answered in {took:.1f} s: {info.value}")
        assert took < 10
        assert f"no engine registered within 5 s (Slurm job {job}: PENDING)" in str(info.value)
        assert "Its engines start when the job runs: `%nbp connect --wait" in str(info.value)
        # A squeue that cannot reach its controller says so; it is not "no longer queued".
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("SLURM_CONF")  # and no /etc/slurm/slurm.conf: nowhere to ask
            told = ipc.job_states((("slurm", job),))
        assert told.startswith(f"Slurm job {job}: state unknown, squeue failed:"), told

        said: list[str] = []

        def release(line: str) -> None:
            if not said:
                slurm.run(["scontrol", "update", "partitionname=held", "state=up"])
            said.append(line)

        pool = nbparallel.Pool.connect(PROFILE, cid, wait=CONNECT_WAIT, gpus="none",
                                       say=release)
        session = nbparallel.Session(pool)
        print(f"connect --wait said {said}")
        assert said[0].startswith(f"nbparallel: waiting for engines: 0 of 2 registered "
                                  f"(Slurm job {job}: PENDING), {CONNECT_WAIT} s left")
        assert len(session.ids) == 2
        out = nbparallel.scatter("y = x + 1", {"x": np.arange(5)}, gather=["y"], pool=session,
                                 echo=lambda s: None)
        np.testing.assert_array_equal(out["y"], np.arange(5) + 1)
        session.stop()
        session = None
        stopped = True
        _stop_cluster(slurm, PROFILE, cid, job)
    finally:
        if session is not None:
            session.stop()
        if not stopped:
            _stop_cluster(slurm, PROFILE, cid)
        slurm.run(["scontrol", "update", "partitionname=held", "state=down"], check=False)
