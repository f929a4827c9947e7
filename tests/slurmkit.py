"""A one-node Slurm cluster in a temporary directory, for tests/test_slurm.py.

Everything it needs lives in the directory: a MUNGE key and socket (its own ``munged``, not the
machine's), a ``slurm.conf`` on free ports, the daemons' state, spool and logs. Nothing of the
machine is changed for good, and every process it starts (the daemons and whatever they start,
down to the engines of a batch job) carries ``NBP_SLURMKIT=<directory>`` in its environment, so
that :meth:`Slurm.stop` can find and end each one, and only those.

Needs root (slurmd runs jobs as their user, and a one-node cluster runs its daemons as root).
What the configuration needs in a container, line by line, is said where it is written.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

#: The programs a one-node cluster needs (Debian's slurm-wlm and munge).
PROGRAMS = ("munged", "mungekey", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol",
            "scancel")
NODE = "localhost"
STOP_WAIT = 10.0  # seconds a daemon gets to leave after SIGTERM before SIGKILL
MARKER = "NBP_SLURMKIT"


def _path(program: str) -> str | None:
    """Where ``program`` is: on PATH, or in /usr/sbin (the daemons' home, not always on PATH)."""
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")


def missing() -> list[str]:
    """The programs of :data:`PROGRAMS` that are nowhere to be found."""
    return [p for p in PROGRAMS if _path(p) is None]


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"--- {path.name}: (none)"
    return f"--- {path.name}:\n" + "\n".join(text)


class Slurm:
    """``munged``, ``slurmctld`` and ``slurmd`` for one node, ``localhost``, with ``cpus`` CPUs and
    two partitions: ``debug`` (the default, up) and ``held`` (down: jobs queue there, PENDING,
    until ``scontrol update partitionname=held state=up``)."""

    def __init__(self, cpus: int = 4):
        self.cpus = cpus
        self.dir = Path(tempfile.mkdtemp(prefix="nbp-slurm-"))
        # munged wants every directory above its socket searchable by all ("Socket is
        # inaccessible: execute permissions for all required"); mkdtemp makes it 0700.
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.socket = self.dir / "munge" / "munge.socket"
        self.logs = self.dir / "log"
        self.logs.mkdir()
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), **{MARKER: str(self.dir)})
        self.daemons: dict[str, subprocess.Popen] = {}

    # -- starting ---------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "Slurm":
        try:
            self._start_munge()
            self._write_conf()
            # -D: in the foreground, so the daemon is our child and its output our log file.
            # -c (slurmctld): no state from an earlier run. -N: the node's name is not the
            # machine's hostname, which slurm.conf does not know.
            self._daemon("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            self._daemon("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait_for("the node to be idle", lambda: self.node_state() == "idle", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key = self.dir / "munge" / "munge.key"
        key.parent.mkdir(mode=0o755)
        self.run(["mungekey", "--create", f"--keyfile={key}"])  # 0600, owned by us: as munged wants
        self._daemon("munged", [
            "munged", "--foreground", f"--key-file={key}", f"--socket={self.socket}",
            f"--pid-file={key.parent / 'munged.pid'}", f"--seed-file={key.parent / 'munged.seed'}",
            f"--log-file={self.logs / 'munged.log'}",
        ])
        self._wait_for("munged's socket", lambda: self.run(
            ["munge", f"--socket={self.socket}", "--string=ok"], check=False).returncode == 0, 10)

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        ctld, slurmd = _free_ports(2)
        d = self.dir
        lines = [
            "ClusterName=nbptest",
            # slurmctld accepts the name "localhost" for the host it runs on; the address in
            # parentheses is where clients and slurmd reach it.
            f"SlurmctldHost={NODE}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            f"SlurmdPort={slurmd}",       # free ports: a machine's own Slurm keeps 6817/6818
            "SlurmUser=root",             # no slurm user needed (the package makes one anyway)
            "SlurmdUser=root",
            # Our own munged: AuthInfo's socket= is read by auth/munge and cred/munge alike.
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            "MpiDefault=none",            # srun starts the engines itself; no PMI needed
            # No cgroups: containers seldom let slurmd create them. linuxproc tracks a job's
            # processes by parent pid; task/none binds nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",  # no slurmdbd
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",  # a task needs one CPU, nothing of memory
            # Believe the node's line below rather than the hardware: CPUs may be more than
            # the container has (two engine jobs at once on a 2-core machine), and the
            # socket/core split need not match, without slurmctld draining the node.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",          # a node that was down comes back when slurmd registers
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            f"PlugStackConfig={d / 'plugstack.conf'}",  # none: not the machine's spank plugins
            "MailProg=/bin/true",
            "SchedulerType=sched/builtin",  # FIFO, no backfill pass: nothing here needs one
            "InactiveLimit=0",
            "KillWait=5",                 # scancel: SIGTERM, then SIGKILL 5 s later (default 30)
            "MinJobAge=2",
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={NODE} CPUs={self.cpus} "
            f"RealMemory=100 State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=30 State=UP",
            f"PartitionName=held Nodes={NODE} MaxTime=30 State=DOWN",
        ]
        (d / "plugstack.conf").write_text("")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, name: str, argv: list[str]) -> None:
        out = open(self.logs / f"{name}.out", "wb")
        try:
            self.daemons[name] = subprocess.Popen(
                [_path(argv[0]) or argv[0], *argv[1:]], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        finally:
            out.close()

    def _wait_for(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:g} s"
                raise RuntimeError(f"Slurm in {self.dir}: waiting for {what}: {why}\n"
                                   + self.log_tails())
            time.sleep(0.25)

    def log_tails(self) -> str:
        """The logs' ends, and why slurmctld set the node aside (e.g. "Low CPUs": slurm.conf
        gives it more than slurmd found, without SlurmdParameters=config_overrides)."""
        names = ["munged.out", "slurmctld.log", "slurmd.log", "slurmd.out"]
        said = [tail(self.logs / n) for n in names]
        ctld = self.daemons.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                reasons = self.run(["sinfo", "-R", "-o", "%N %T %E"], check=False, timeout=10)
                said.append("--- sinfo -R:\n" + reasons.stdout)
            except subprocess.SubprocessError:
                pass
        return "\n".join(said)

    # -- using ------------------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 30.0
            ) -> subprocess.CompletedProcess:
        return subprocess.run([_path(argv[0]) or argv[0], *argv[1:]], capture_output=True,
                              text=True, env=self.env, check=check, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def node_state(self) -> str:
        out = self.run(["sinfo", "--noheader", "--nodes", NODE, "--format=%T"], check=False,
                       timeout=10)
        return out.stdout.strip()

    def jobs(self) -> dict[str, str]:
        """Job id -> state, for the jobs slurmctld still lists (empty when it does not answer)."""
        out = self.run(["squeue", "--noheader", "--format=%i %T"], check=False, timeout=10)
        return dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())

    # -- stopping ---------------------------------------------------------------------------------
    def ours(self) -> list[psutil.Process]:
        """Every live process carrying our marker (not this one): daemons, slurmstepd, jobs.
        The raw /proc/<pid>/environ is searched: slurmstepd and slurmscriptd write their titles
        over the start of theirs, which a parsed environment then misses."""
        mark = f"\0{MARKER}={self.dir}\0".encode()
        found = []
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
                if mark in b"\0" + raw + b"\0" and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons (SIGTERM, then SIGKILL after STOP_WAIT), end any
        process left with our marker, remove the directory. Safe to call twice. Returns what
        had to be killed that way (nothing, when the jobs and daemons ended as asked)."""
        swept: list[str] = []
        try:
            if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
                try:
                    if self.jobs():
                        self.run(["scancel", "--full", "--user=root"], check=False, timeout=10)
                        deadline = time.monotonic() + 15
                        while self.jobs() and time.monotonic() < deadline:
                            time.sleep(0.5)
                except subprocess.SubprocessError:
                    pass
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.daemons.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                proc.terminate()
                try:
                    proc.wait(STOP_WAIT)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # its own session: its group
                    except ProcessLookupError:
                        pass
                    proc.wait(STOP_WAIT)
            left = self.ours()
            for proc in left:
                try:
                    swept.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=STOP_WAIT)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        return swept
