"""The GPU lock: one `flock` per GPU, `<lock_dir>/gpu<N>.lock`, shared by every home and tool.

The lock is taken on a descriptor we open ourselves (`filelock.lock_descriptor`,
the same primitive `filelock.FileLock` uses, so other tools that use filelock on
that path contend with us), and that descriptor is handed to the attempt's
process (`pass_fds`). An flock belongs to the open file description, not to a
process: it is held until every descriptor of it is closed. The daemon closes
its own copy right after the launch, so the lock lives exactly as long as the
attempt's processes, even when the daemon is SIGKILLed, and a restarted
daemon cannot start a second training beside a survivor. Nobody ever calls
LOCK_UN on it: that would release the child's hold too.

A job on several GPUs takes every one of their locks, in index order, all or
none (`try_acquire_all`): it never holds one lock while it waits for another,
so two jobs (or a job and `nanod exec`) never deadlock over them, and a job
that cannot have them all waits naming the holder of the first one it lacks.

filelock 4.x leaves the lock file in place on Unix (the inode stays shared by
waiters), and so do we. Who holds the lock is written beside it in
`gpu<N>.lock.holder.json` ({pid, command, home, job, since}); when that file is
stale or absent, /proc/locks names the holding pid.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from filelock import lock_descriptor

from daemon import procs
from daemon.atomic import read_json, write_json_atomic


def holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder.json")


def try_acquire(lock_path: Path) -> int | None:
    """The descriptor holding the lock (O_CLOEXEC: inherited only through pass_fds), or None when held."""
    lock_path = Path(lock_path)
    if not lock_path.parent.is_dir():
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except FileExistsError:
            raise NotADirectoryError(f"the lock directory {lock_path.parent} is not a directory") from None
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        if lock_descriptor(fd, blocking=False):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def acquire(lock_path: Path, timeout: float | None = None, poll: float = 0.1,
            on_wait=None) -> int | None:
    """Wait for the lock (forever when timeout is None); None on timeout. on_wait(reason) is called once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        fd = try_acquire(lock_path)
        if fd is not None:
            return fd
        if on_wait is not None and not told:
            on_wait(describe_holder(lock_path))
            told = True
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(poll)


def try_acquire_all(lock_paths: list[Path]) -> tuple[list[int] | None, Path | None]:
    """Every lock, taken in the order given (callers give index order), or none of them.

    Returns (descriptors, None), or (None, the first path that is held). An
    OSError (a lock that cannot be opened) releases what was taken and propagates.
    """
    fds: list[int] = []
    try:
        for path in lock_paths:
            fd = try_acquire(path)
            if fd is None:
                release_all(fds)
                return None, Path(path)
            fds.append(fd)
    except BaseException:
        release_all(fds)
        raise
    return fds, None


def acquire_all(lock_paths: list[Path], timeout: float | None = None, poll: float = 0.1,
                on_wait=None) -> list[int] | None:
    """Wait for every lock (all or none at each try, so nothing is held while waiting); None on timeout.

    on_wait(path, holder words) is called once, for the first lock found held.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        fds, held = try_acquire_all(lock_paths)
        if fds is not None:
            return fds
        if on_wait is not None and not told:
            on_wait(held, describe_holder(held))
            told = True
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(poll)


def release_all(fds: list[int]) -> None:
    for fd in fds:
        release(fd)


def release(fd: int) -> None:
    """Close our copy of the descriptor (never LOCK_UN: a child may share the hold)."""
    try:
        os.close(fd)
    except OSError:
        pass


def write_holder(lock_path: Path, *, pid: int, command: list[str] | str, home: str | None = None,
                 job: str | None = None) -> None:
    cmd = command if isinstance(command, str) else " ".join(command)
    write_json_atomic(holder_path(Path(lock_path)),
                      {"pid": pid, "command": cmd[:300], "home": home, "job": job, "since": time.time()})


def read_holder(lock_path: Path) -> dict | None:
    info = read_json(holder_path(Path(lock_path)))
    return info if isinstance(info, dict) else None


def is_held(lock_path: Path) -> bool:
    """Whether someone holds the lock now (probed without keeping it)."""
    if not Path(lock_path).exists():
        return False
    fd = try_acquire(lock_path)
    if fd is None:
        return True
    os.close(fd)
    return False


def describe_holder(lock_path: Path) -> str:
    """Who holds the lock, in words: "pid 42 (python train.py), job tiny of /home/x/nanod"."""
    lock_path = Path(lock_path)
    info = read_json(holder_path(lock_path))
    holders = _proc_locks_pids(lock_path)
    if isinstance(info, dict) and isinstance(info.get("pid"), int) and procs.is_alive(info["pid"]):
        pid = info["pid"]
        # /proc/locks names the process that took the lock: the daemon (the holder's parent), or
        # nobody alive when the taker died and the holder inherited it; another live pid means a stale file
        live = [h for h in holders if procs.is_alive(h)]
        group = procs.group_of(pid)
        if not live or pid in live or procs.parent(pid) in live or \
                (group is not None and any(procs.group_of(h) == group for h in live)):
            words = f"pid {pid} ({info.get('command') or procs.command(pid) or '?'})"
            if info.get("job"):
                words += f", job {info['job']}"
            if info.get("home"):
                words += f" of {info['home']}"
            return words
    for pid in holders:
        if procs.is_alive(pid):
            return f"pid {pid} ({procs.command(pid) or '?'})"
    return "another process"


def _proc_locks_pids(lock_path: Path) -> list[int]:
    """PIDs /proc/locks gives for FLOCKs on this file (the pid that took it, which may have exited)."""
    try:
        st = lock_path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    want = f":{st.st_ino}"
    pids = []
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after the number
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].endswith(want):
            try:
                pids.append(int(parts[4]))
            except ValueError:
                pass
    return pids
