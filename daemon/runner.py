"""Starts one attempt as a process group, logs it to a file, reads its progress, kills it.

An attempt is one subprocess (never through a shell) in its own session and
process group. Its stdout and stderr go straight to
`<home>/logs/<job>/attempt-NNN.log`, never through a pipe to the daemon, so
the trainer outlives a daemon that dies. Progress is read back from that file
with an offset (partial lines wait for their newline). The GPU lock's
descriptor is passed in (`pass_fds`) so the attempt holds the lock by itself.

Killing means the whole group: SIGTERM and SIGCONT (a SIGSTOPped trainer must
wake up to die), SIGKILL after the grace. A survivor left by an earlier daemon
is adopted by pid + /proc start time (a reused pid is not mistaken for it).
What to do about an exit is the supervisor's business, not this module's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from daemon.runners import Launch
from trainer import layout

# dropped from the daemon's environment: they are systemd's messages to the daemon, not to the trainer
_DROP_PREFIXES = ("WATCHDOG_", "LISTEN_")
_DROP = {"NOTIFY_SOCKET"}
# the training safety guide's defaults, under the job's own env
GUIDE_ENV = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
GUIDE_ENV_NO_COMPILE = {"TORCH_COMPILE_DISABLE": "1"}   # mid and sft: no torch.compile (memory)


def build_env(settings, spec, phase_index: int, attempt_n: int, launch_env: dict[str, str]) -> dict[str, str]:
    """The attempt's environment: the daemon's, cleaned, then defaults, then the job's and the phase's."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(_DROP_PREFIXES)}
    env.update(GUIDE_ENV)
    if spec.phases[phase_index].phase in ("mid", "sft"):
        env.update(GUIDE_ENV_NO_COMPILE)
    env.update({"PYTHONUNBUFFERED": "1", "NANOCHAT_BASE_DIR": str(settings.checkpoint_root),
                "NANOD_ATTEMPT": str(attempt_n), "CUDA_VISIBLE_DEVICES": str(spec.gpu)})
    env.update(launch_env)
    env.update(spec.phase_env(phase_index))
    return env


def log_path(settings, job: str, attempt_n: int) -> Path:
    return settings.logs_dir / job / f"attempt-{attempt_n:03d}.log"


class AttemptProcess:
    """A running attempt: our child (Popen) or a survivor adopted by pid."""

    def __init__(self, pid: int, pgid: int, proc_start: int | None, popen: subprocess.Popen | None = None):
        self.pid, self.pgid, self.proc_start, self.popen = pid, pgid, proc_start, popen
        self.returncode: int | None = None   # None while alive, and for a survivor whose code we cannot know
        self.exited = False

    @classmethod
    def adopt(cls, pid: int, pgid: int | None, proc_start: int | None) -> "AttemptProcess | None":
        """The recorded attempt if that very process still lives, else None."""
        if not pid or not pid_matches(pid, proc_start):
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
        elif pid_matches(self.pid, self.proc_start):
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

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def start_attempt(launch: Launch, env: dict[str, str], log: Path, *, pass_fds: tuple[int, ...] = (),
                  header: str = "") -> AttemptProcess:
    """Start the attempt in its own session with its output in `log`. Raises OSError if it cannot start."""
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        if header:
            os.write(fd, f"# nanod: {header}\n".encode())
        popen = subprocess.Popen(launch.argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                 env=env, cwd=launch.cwd, start_new_session=True, pass_fds=pass_fds,
                                 close_fds=True)
    finally:
        os.close(fd)
    return AttemptProcess(popen.pid, popen.pid, proc_start_time(popen.pid), popen)


# ---- reading the log ---------------------------------------------------------------
class LogTail:
    """New complete lines of a growing file, from an offset; a partial last line waits for its newline."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset, self._partial = Path(path), offset, b""

    def read_lines(self, max_bytes: int = 1 << 20) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # truncated: start again
                    self.offset, self._partial = 0, b""
                if size == self.offset:
                    return []
                f.seek(self.offset)
                data = f.read(max_bytes)
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > max_bytes:  # a "line" that never ends: drop it
            self._partial = b""
        # a progress bar redraws with \r: the text after the last one is what the line says
        return [ln.rsplit(b"\r", 1)[-1].decode("utf-8", errors="replace") for ln in lines]


def read_tail(path: Path, nbytes: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - nbytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def last_error_line(tail: str) -> str:
    """The line that best says why an attempt ended: the last one that is not progress chatter."""
    for line in reversed(tail.splitlines()):
        line = line.rsplit("\r", 1)[-1].strip()
        if line and not line.startswith(("step ", "# nanod:", "paused:", "resumed:")):
            return line[:300]
    return ""


# ---- checkpoints -------------------------------------------------------------------
def newest_checkpoint(ckpt_dir: Path, *, since: float | None = None, is_complete=layout.is_complete) -> int | None:
    """The newest complete checkpoint (the adapter's is_complete, trainer.layout's by default) whose
    meta was written at or after `since` (a stale directory of an older job with the same model_tag
    is not resumed from)."""
    for step in reversed(layout.list_steps(ckpt_dir)):
        if not is_complete(ckpt_dir, step):
            continue
        if since is not None:
            try:
                if layout.meta_path(ckpt_dir, step).stat().st_mtime < since - 2.0:
                    continue
            except OSError:
                continue
        return step
    return None


# ---- processes ---------------------------------------------------------------------
def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), None when gone."""
    stat = _read_stat(pid)
    return int(stat[19]) if stat else None


def pid_matches(pid: int, proc_start: int | None) -> bool:
    """Whether `pid` is alive (not a zombie) and, when known, is the process that started at proc_start."""
    stat = _read_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return proc_start is None or int(stat[19]) == proc_start


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (scanning /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat and stat[0] not in ("Z", "X") and int(stat[2]) == pgid:
                out.append(int(entry))
    return out


def _read_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name: [state, ppid, pgrp, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def wait_gone(proc: AttemptProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not proc.poll():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
