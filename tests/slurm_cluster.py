"""A real one-node SLURM cluster on this machine, for the SLURM tests (and by hand: `python -m tests.slurm_cluster`).

Debian's slurm-wlm and munge, run as root in a private directory (0700): its
own munged socket and key, slurmctld and slurmd on free ports, their own state,
spool and log folders. ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
need no cgroups; JobRequeue=1 lets a job be requeued. Every client (sbatch,
squeue, scontrol, scancel) and the daemon under test find it through
SLURM_CONF. `Cluster.stop` cancels what is left and stops the three daemons by
their pids, never by name.

`why_not()` says why no cluster can start here (not root, packages missing);
the tests are skipped with that reason.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")

CONF = """\
ClusterName=nanodtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/run/munge.socket
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
KillWait={kill_wait}
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def why_not() -> str | None:
    """None when a private cluster can start here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "a private SLURM cluster needs root (slurmd runs jobs as their user)"
    missing = [name for name, path in DAEMONS.items() if not os.access(path, os.X_OK)]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One running cluster: `conf` is its slurm.conf, `env` what a client needs."""

    def __init__(self, kill_wait: int = 10):
        self.dir = Path(tempfile.mkdtemp(prefix="nanod-slurm-"))
        os.chmod(self.dir, 0o700)
        self.kill_wait = kill_wait
        self.conf = self.dir / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "Cluster":
        for sub in ("run", "log", "state", "spool"):
            (self.dir / sub).mkdir(mode=0o700)
        key = self.dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20) * 3 // 4
        self.conf.write_text(CONF.format(host=self.host, ctld_port=free_port(), slurmd_port=free_port(),
                                         dir=self.dir, kill_wait=self.kill_wait, cpus=os.cpu_count() or 1,
                                         mem_mb=mem_mb))
        run = self.dir / "run"
        self._spawn("munged", [DAEMONS["munged"], "-F", "-f", f"--key-file={key}",
                               f"--socket={run}/munge.socket", f"--pid-file={run}/munged.pid",
                               f"--log-file={self.dir}/log/munged.log", f"--seed-file={run}/munged.seed"])
        self._wait(lambda: (run / "munge.socket").exists(), 10, "munged's socket")
        self._spawn("slurmctld", [DAEMONS["slurmctld"], "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [DAEMONS["slurmd"], "-D", "-f", str(self.conf)])
        self._wait(self._node_ready, timeout, "the node to be idle in sinfo")
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "ab")
        try:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                env=self.env, start_new_session=True)
        finally:
            out.close()

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f}s"
                logs = " | ".join(f"{p.name}: {p.read_text(errors='replace').strip().splitlines()[-1]}"
                                  for p in sorted((self.dir / "log").glob("*.log")) if p.read_text(errors="replace").strip())
                self.stop()
                raise RuntimeError(f"private SLURM cluster: {why} waiting for {what}; last log lines: {logs}")
            time.sleep(0.2)

    def _node_ready(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
        return out in ("idle", "mixed", "allocated")

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, check=check, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` of one job as a dict (the keys the tests look at), {} when it is unknown."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        out = {}
        for key in ("JobState", "Reason", "Restarts", "ExitCode", "JobName", "NodeList", "BatchFlag", "StartTime"):
            m = re.search(rf"\b{key}=(\S*)", r.stdout)
            if m:
                out[key] = m.group(1)
        return out

    def jobs(self) -> list[tuple[str, str, str]]:
        """(id, name, state) of every job squeue lists."""
        r = self.run("squeue", "-h", "-o", "%i|%j|%T", check=False)
        return [tuple(line.split("|", 2)) for line in r.stdout.splitlines() if line.count("|") == 2]

    def start_now(self, job_id: str) -> bool:
        """A requeued job waits ~2 min (BeginTime) by SLURM's design: start it at once. Only once it is
        PENDING and its old run is gone: started while the requeue is still ending that run, SLURM kills
        it ("Killing non-startable batch job: Job credential revoked") and the job FAILS."""
        info = self.job(job_id)
        if info.get("JobState") != "PENDING" or info.get("Reason") != "BeginTime":
            return False
        if any(i == str(job_id) and state != "PENDING" for i, _, state in self.jobs()):
            return False
        time.sleep(1.0)
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
        return True

    def cancel_all(self, timeout: float = 30) -> None:
        ids = [j[0] for j in self.jobs()]
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not os.environ.get("NANOD_SLURM_KEEP"):   # set it to read the cluster's logs after a failure
            shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    import sys
    reason = why_not()
    if reason:
        sys.exit(reason)
    c = Cluster().start()
    print(f"export SLURM_CONF={c.conf}   # Ctrl-C stops the cluster")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
