"""Launcher `local`: an attempt as a process group on this machine, holding the job's GPU lock.

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
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from daemon import procs
from daemon.gpu import lock as gpulock


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
        if self.popen is not None:
            if self.popen.poll() is None:
                return False
            self.returncode = self.popen.returncode
        elif procs.is_alive(self.pid, self.proc_start):
            return False
        self.exited = True
        self.kill_stragglers()
        return True

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

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


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
    """Launcher for this machine: the job's GPU lock, then a process group."""

    name = "local"

    def __init__(self, settings):
        self.settings = settings

    def reserve(self, rec) -> int | str:
        """The GPU lock's descriptor, or why the job waits for it."""
        gpu = rec.job_spec.gpu
        lock_path = self.settings.gpu_lock_path(gpu)
        try:
            fd = gpulock.try_acquire(lock_path)
        except OSError as e:
            return f"cannot use GPU {gpu}'s lock {lock_path}: {e.strerror or e}"
        if fd is None:
            return f"waiting for GPU {gpu}'s lock, held by {gpulock.describe_holder(lock_path)}"
        return fd

    def release(self, reservation) -> None:
        """Close the daemon's copy of the lock (the attempt, once started, holds its own)."""
        if isinstance(reservation, int):
            gpulock.release(reservation)

    def place_env(self, rec) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": str(rec.job_spec.gpu)}

    def start(self, rec, launch, env: dict[str, str], log: Path, reservation, *, header: str = "") -> LocalProcess:
        proc = start_process(launch.argv, env, log, cwd=launch.cwd, pass_fds=(reservation,), header=header)
        gpulock.write_holder(self.settings.gpu_lock_path(rec.job_spec.gpu), pid=proc.pid, command=launch.argv,
                             home=str(self.settings.home), job=rec.name)
        return proc

    def adopt(self, rec, att) -> LocalProcess | None:
        """The attempt `att` if it still runs: by its recorded pid, else by the lock's holder file
        (the daemon died between starting it and recording the pid)."""
        if att.pid:
            proc = LocalProcess.adopt(att.pid, att.pgid, att.proc_start)
            if proc is not None:
                return proc
        holder = gpulock.read_holder(self.settings.gpu_lock_path(rec.job_spec.gpu))
        if (holder and holder.get("job") == rec.name and holder.get("home") == str(self.settings.home)
                and isinstance(holder.get("pid"), int) and holder.get("since", 0) >= att.started_at - 1):
            pid = holder["pid"]
            return LocalProcess.adopt(pid, pid, procs.start_ticks(pid))
        return None
