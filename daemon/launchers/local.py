"""Launcher `local`: an attempt as a process group on this machine, holding the job's GPU locks.

An attempt is one subprocess (never through a shell) in its own session and
process group. Its stdout and stderr go straight to its log file, never
through a pipe to the daemon, so the trainer outlives a daemon that dies. The
GPU lock's descriptor is passed in (`pass_fds`) and the daemon closes its own
copy, so the attempt holds the lock by itself for as long as it lives
(daemon/gpu/lock.py).

Stopping means the whole group: SIGTERM and SIGCONT (a SIGSTOPped trainer must
wake up to die), SIGKILL after the grace. A survivor left by an earlier daemon
is adopted by pid + start time (a reused pid is not mistaken for it), or by
the lock's holder file when the daemon died before recording the pid.

A job on several GPUs (`gpus:`) takes every GPU's lock, in index order, all or
none, and runs its trainer's command through torchrun (daemon/launchers/
torchrun.py), one rank per GPU, with CUDA_VISIBLE_DEVICES listing exactly its
GPUs. torchrun's ranks live in sessions of their own, so the process nanod
starts, records and adopts is a keeper (daemon/launchers/keeper.py) that holds
the locks until the last rank is gone; the handle (`GroupProcess`) stops the
group through the keeper and kills it rank by rank, and reads the ranks' own
exit codes and errors back from torchrun's failure report.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon import procs
from daemon.attempt_log import last_error_line, read_tail
from daemon.gpu import lock as gpulock
from daemon.launchers import torchrun

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # where `python -m daemon.launchers.keeper` is found


class LocalProcess:
    """A running attempt: our child (Popen) or a survivor adopted by pid."""

    def __init__(self, pid: int, pgid: int, proc_start: int | None, popen: subprocess.Popen | None = None):
        self.pid, self.pgid, self.proc_start, self.popen = pid, pgid, proc_start, popen
        self.returncode: int | None = None   # None while alive, and for a survivor whose code we cannot know
        self.exited = False

    @classmethod
    def adopt(cls, pid: int, pgid: int | None, proc_start: int | None) -> "LocalProcess | None":
        """The recorded attempt if that very process still lives, else None."""
        if not pid or not procs.is_alive(pid, proc_start):
            return None
        return cls(pid, pgid or pid, proc_start)

    def poll(self) -> bool:
        """True once the attempt's main process has exited (it is reaped here)."""
        if self.exited:
            return True
        code = None
        if self.popen is not None:
            if (code := self.popen.poll()) is None:
                return False
        elif procs.is_alive(self.pid, self.proc_start):
            return False
        self.exited = True
        self.returncode = self._returncode(code)
        self.kill_stragglers()
        return True

    def _returncode(self, code: int | None) -> int | None:
        """The attempt's exit code from its main process's (None: an adopted survivor's is unknown)."""
        return code

    def terminate(self) -> None:
        """SIGTERM to the group (the trainer saves an emergency checkpoint), SIGCONT in case it is stopped."""
        self._signal_group(signal.SIGTERM)
        self._signal_group(signal.SIGCONT)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    def kill_stragglers(self) -> None:
        """After the main process: any process left in its group goes too (it may hold the GPU lock)."""
        self._signal_group(signal.SIGKILL)

    def describe(self) -> str:
        return f"process group {self.pgid}"

    def trainer_tail(self, tail: str) -> str:
        """The trainer's own output in a log tail (here: all of it)."""
        return tail

    def error_line(self, tail: str, returncode: int | None = None) -> str:
        return last_error_line(tail, returncode)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class GroupProcess(LocalProcess):
    """A torchrun group under its keeper (the process recorded: pid, pgid, start time)."""

    def __init__(self, pid: int, pgid: int, proc_start: int | None, popen: subprocess.Popen | None = None, *,
                 log: Path | None = None, token: str = "", nproc: int = 0):
        super().__init__(pid, pgid, proc_start, popen)
        self.log, self.token, self.nproc = log, token, nproc
        self.keeper_returncode: int | None = None

    def _returncode(self, code: int | None) -> int | None:
        """The keeper exits only after every rank is gone, with torchrun's status; torchrun exits 1
        whatever a rank said, so the attempt's code is the rank's own, from torchrun's report."""
        self.keeper_returncode = code
        tail = read_tail(self.log) if self.log else ""
        return torchrun.rank_returncode(code, tail)

    def terminate(self) -> None:
        """SIGTERM to the keeper, which passes it on to each rank once (with SIGCONT); the ranks save
        their emergency checkpoint together. SIGCONT to everything, in case something is stopped."""
        self._signal_pid(self.pid, signal.SIGCONT)
        self._signal_pid(self.pid, signal.SIGTERM)
        for pid in procs.descendants(self.pid):
            self._signal_pid(pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL to torchrun and every rank; the keeper reaps them and exits (freeing the locks) last."""
        for pid in procs.descendants(self.pid) + self._marked():
            self._signal_pid(pid, signal.SIGKILL)
        self._signal_pid(self.pid, signal.SIGCONT)

    def kill_stragglers(self) -> None:
        """After the keeper: a rank still carrying this group's mark (its keeper was SIGKILLed) goes too."""
        for pid in self._marked():
            self._signal_pid(pid, signal.SIGKILL)

    def describe(self) -> str:
        return f"torchrun group of {self.nproc} ranks (keeper pid {self.pid})"

    def trainer_tail(self, tail: str) -> str:
        return torchrun.trainer_output(tail)

    def error_line(self, tail: str, returncode: int | None = None) -> str:
        return torchrun.error_line(tail)   # the keeper's code is torchrun's: the report says more

    def _marked(self) -> list[int]:
        if not self.token:
            return []
        me = os.getpid()
        return [pid for pid in procs.find(lambda pid: pid != me and procs.environ(pid).get(GROUP_ENV) == self.token)]

    @staticmethod
    def _signal_pid(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


GROUP_ENV = "NANOD_GROUP"  # every process of a torchrun group carries its attempt's mark (inherited)


def start_process(argv: list[str], env: dict[str, str], log: Path, *, cwd: Path | None = None,
                  pass_fds: tuple[int, ...] = (), header: str = "") -> LocalProcess:
    """Start `argv` in its own session with its output in `log`. Raises OSError if it cannot start."""
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        if header:
            os.write(fd, f"# nanod: {header}\n".encode())
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                 env=env, cwd=cwd, start_new_session=True, pass_fds=pass_fds, close_fds=True)
    finally:
        os.close(fd)
    return LocalProcess(popen.pid, popen.pid, procs.start_ticks(popen.pid), popen)


def wait_gone(proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not proc.poll():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class LocalLauncher:
    """Launcher for this machine: the job's GPU locks, then a process group (through torchrun for several)."""

    name = "local"

    def __init__(self, settings):
        self.settings = settings

    def reserve(self, rec) -> list[int] | str:
        """The descriptors of every GPU lock of the job (taken in index order, all or none), or why it waits."""
        gpus = sorted(rec.job_spec.gpu_indices)
        paths = [self.settings.gpu_lock_path(g) for g in gpus]
        try:
            fds, held = gpulock.try_acquire_all(paths)
        except OSError as e:
            path = Path(e.filename) if getattr(e, "filename", None) else paths[0]
            return f"cannot use the GPU lock {path}: {e.strerror or e}"
        if fds is None:
            gpu = gpus[paths.index(held)]
            return f"waiting for GPU {gpu}'s lock, held by {gpulock.describe_holder(held)}"
        return fds

    def release(self, reservation) -> None:
        """Close the daemon's copies of the locks (the attempt, once started, holds its own)."""
        if isinstance(reservation, list):
            gpulock.release_all(reservation)

    def place_env(self, rec) -> dict[str, str]:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, rec.job_spec.gpu_indices))}
        if rec.job_spec.world_size > 1:
            env[GROUP_ENV] = self.group_token(rec, len(rec.attempts))
        return env

    def group_token(self, rec, attempt_n: int) -> str:
        return f"{self.settings.home}/{rec.name}/{attempt_n}"

    def start(self, rec, launch, env: dict[str, str], log: Path, reservation, *, header: str = "") -> LocalProcess:
        spec = rec.job_spec
        fds = tuple(reservation)
        if spec.world_size == 1:
            proc = start_process(launch.argv, env, log, cwd=launch.cwd, pass_fds=fds, header=header)
            command = launch.argv
        else:
            command = torchrun.wrap(launch.argv, spec.world_size)
            keeper = [sys.executable, "-m", "daemon.launchers.keeper"]
            keeper += (["--cwd", str(launch.cwd)] if launch.cwd else []) + ["--", *command]
            started = start_process(keeper, env, log, cwd=PACKAGE_ROOT, pass_fds=fds,
                                    header=f"{header} (torchrun: {' '.join(command)})" if header else "")
            proc = GroupProcess(started.pid, started.pgid, started.proc_start, started.popen, log=log,
                                token=env.get(GROUP_ENV, ""), nproc=spec.world_size)
        for gpu in sorted(spec.gpu_indices):
            gpulock.write_holder(self.settings.gpu_lock_path(gpu), pid=proc.pid, command=command,
                                 home=str(self.settings.home), job=rec.name)
        return proc

    def adopt(self, rec, att) -> LocalProcess | None:
        """The attempt `att` if it still runs: by its recorded pid, else by the lock's holder file
        (the daemon died between starting it and recording the pid)."""
        pid, pgid, start = att.pid, att.pgid, att.proc_start
        if not (pid and procs.is_alive(pid, start)):
            holder = gpulock.read_holder(self.settings.gpu_lock_path(sorted(rec.job_spec.gpu_indices)[0]))
            if not (holder and holder.get("job") == rec.name and holder.get("home") == str(self.settings.home)
                    and isinstance(holder.get("pid"), int) and holder.get("since", 0) >= att.started_at - 1):
                return None
            pid = holder["pid"]
            pgid, start = pid, procs.start_ticks(pid)
        if rec.job_spec.world_size == 1:
            return LocalProcess.adopt(pid, pgid, start)
        if not procs.is_alive(pid, start):
            return None
        return GroupProcess(pid, pgid or pid, start, log=self.settings.home / att.log,
                            token=self.group_token(rec, att.n), nproc=rec.job_spec.world_size)
