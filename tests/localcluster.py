"""A real cluster on this machine for launch tests: munge + slurmctld + two slurmd (nodes n1, n2 on one
host (see docs/launch.md and the Makefile's system-deps target, which installs the Debian packages). The
pairs of network namespaces that act as two hosts are launch/netns.py.

Every daemon runs in its own session (setsid) with its files under one temporary directory, and is
stopped by its own PID at the end; nothing system-wide is configured or left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from launch.rendezvous import free_port

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")


def missing(programs: tuple[str, ...] | list[str], need_root: bool = True) -> str | None:
    """Why these tests cannot run here (None when they can): not root, or a program is not installed."""
    if need_root and os.geteuid() != 0:
        return "needs root (daemons, network namespaces); CI runs as root"
    absent = [p for p in programs if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    if absent:
        return f"not installed: {', '.join(absent)} (run `make system-deps` as root)"
    return None


def _which(program: str) -> str:
    return shutil.which(program) or str(Path("/usr/sbin", program))


@dataclass
class SlurmCluster:
    """Two Slurm nodes (n1, n2; NodeAddr 127.0.0.1) served by daemons started from `root`."""

    root: Path
    cpus: int = 2
    procs: list[subprocess.Popen] = field(default_factory=list)
    startup_s: float = 0.0

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, scontrol) and jobs: the cluster's SLURM_CONF."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        d, host = self.root, socket.gethostname()
        ctld, p1, p2 = free_port(), free_port(), free_port()
        self.conf.write_text(f"""\
ClusterName=mmpttest
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.socket.2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
TmpFS={d}/tmp/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=10
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs={self.cpus} RealMemory=20000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs={self.cpus} RealMemory=20000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - lives as long as the daemon
        self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        t0 = time.monotonic()
        d = self.root
        for sub in ("state", "spool/n1", "spool/n2", "tmp/n1", "tmp/n2"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)  # munge's socket directory must be searchable
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_conf()
        self._spawn("munged", [_which("munged"), "-F", f"--key-file={key}", f"--socket={d}/munge.socket.2",
                               f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                               f"--seed-file={d}/munged.seed"])
        self._wait(lambda: (d / "munge.socket.2").exists(), timeout_s, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D"])
        for node in ("n1", "n2"):
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node])
        self._wait(self._nodes_idle, timeout_s, "two idle Slurm nodes")
        self.startup_s = time.monotonic() - t0
        return self

    def _nodes_idle(self) -> bool:
        r = self.run(["sinfo", "-h", "-o", "%t %D"], check=False)
        return r.returncode == 0 and any(line.split() == ["idle", "2"] for line in r.stdout.splitlines())

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} while waiting for {what}; "
                                       f"logs in {self.root}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout_s} s; logs in {self.root}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, SIGTERM each daemon by PID (slurmd first), SIGKILL what is left after 10 s, then
        the jobs' own processes: slurmstepd detaches them from the daemons, so a job that hung (a test that
        failed, a mutation under test) would otherwise outlive its test and hold its ports."""
        if self.procs:
            self.run(["scancel", "--full", "--quiet", "--user", str(os.getuid())], check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self._kill_job_processes()

    def _kill_job_processes(self) -> None:
        """SIGKILL every process whose environment names this cluster's slurm.conf (jobs get SLURM_CONF
        from sbatch's environment; this process and its parents never have it)."""
        mark = f"SLURM_CONF={self.conf}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue  # gone already, or not ours to read

    # ------------------------------------------------------------------ client helpers
    def run(self, argv: list[str], check: bool = True, env: Mapping[str, str] | None = None,
            cwd: Path | str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} -> {r.returncode}: {r.stderr.strip()}")
        return r

    def sbatch(self, argv: list[str], env: Mapping[str, str] | None = None,
               cwd: Path | str | None = None) -> int:
        return int(self.run(["sbatch", "--parsable", *argv], env=env, cwd=cwd).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` fields (JobState, Restarts, ExitCode, ...); empty once Slurm forgot it."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if r.returncode != 0:
            return {}
        return dict(item.split("=", 1) for item in r.stdout.split() if "=" in item)

    def diagnostics(self, job_id: int | None = None) -> str:
        """The job's record and the daemons' log tails, for assertion messages."""
        parts = [f"job: {self.job(job_id)}"] if job_id is not None else []
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"):
            f = self.root / name
            if f.exists():
                parts.append(f"--- {name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def wait_job(self, job_id: int, states: set[str], timeout_s: float, where: str = "") -> dict[str, str]:
        """Poll until the job's state is in `states`; TimeoutError with the last state otherwise."""
        deadline, info = time.monotonic() + timeout_s, {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        tail = Path(where).read_text()[-3000:] if where and Path(where).exists() else ""
        raise TimeoutError(f"job {job_id} not in {states} after {timeout_s} s: "
                           f"{info.get('JobState')}\n{tail}")


@contextmanager
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A started cluster, stopped and its directory removed afterwards. The directory is made here, not
    by pytest: munged insists that every parent of its socket is world-searchable (pytest's are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="mmpt-slurm-"))
    cluster = SlurmCluster(root)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
