"""Process facts, in one place: alive, start time, command line, memory, groups and trees.

Every question nanod asks about a process (is the recorded trainer still that
very process, who are its group and its descendants, how much memory do they
use, what command is that lock holder) is answered here, through psutil. What
psutil does not read, the kernel's table of file locks, stays with the lock
(daemon/gpu/lock.py). This module only reads: signalling is the launchers'.

A process is identified by pid plus start time, so a reused pid is never
mistaken for the trainer it once was. Records keep the start time as
/proc/<pid>/stat's starttime in clock ticks (`proc_start`, schema 1), computed
here from psutil's create_time.
"""
from __future__ import annotations

import os

import psutil

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess)


def _process(pid: object) -> psutil.Process | None:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        return psutil.Process(pid)
    except (psutil.Error, OverflowError, ValueError):
        return None


def _ticks(p: psutil.Process) -> int:
    return round((p.create_time() - psutil.boot_time()) * CLOCK_TICKS)


def start_ticks(pid: object) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None when gone."""
    p = _process(pid)
    if p is None:
        return None
    try:
        return _ticks(p)
    except psutil.Error:
        return None


def is_alive(pid: object, proc_start: object = None) -> bool:
    """Whether `pid` runs (a zombie does not) and, when proc_start is given, is the process that started then."""
    p = _process(pid)
    if p is None:
        return False
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if isinstance(proc_start, int) and not isinstance(proc_start, bool):
            return _ticks(p) == proc_start
        return True
    except _GONE:
        return False
    except psutil.AccessDenied:
        return True   # it exists; someone else's


def command(pid: object, limit: int = 200) -> str:
    """The command line as one string ("" when gone or unreadable)."""
    p = _process(pid)
    if p is None:
        return ""
    try:
        return " ".join(p.cmdline())[:limit]
    except psutil.Error:
        return ""


def environ(pid: object) -> dict[str, str]:
    """The process's environment ({} when gone or not ours)."""
    p = _process(pid)
    if p is None:
        return {}
    try:
        return p.environ()
    except psutil.Error:
        return {}


def parent(pid: object) -> int | None:
    p = _process(pid)
    if p is None:
        return None
    try:
        return p.ppid()
    except psutil.Error:
        return None


def group_of(pid: object) -> int | None:
    try:
        return os.getpgid(pid) if isinstance(pid, int) and pid > 0 else None
    except OSError:
        return None


def rss(pid: object) -> int | None:
    """Resident memory in bytes."""
    p = _process(pid)
    if p is None:
        return None
    try:
        return p.memory_info().rss
    except psutil.Error:
        return None


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is `pgid`."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return sorted(out)


def descendants(pid: object) -> list[int]:
    """Live children, grandchildren, ... of `pid` (torchrun's workers run in sessions of their own)."""
    p = _process(pid)
    if p is None:
        return []
    try:
        kids = p.children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for k in kids:
        try:
            if k.status() != psutil.STATUS_ZOMBIE:
                out.append(k.pid)
        except psutil.Error:
            continue
    return out


def find(predicate) -> list[int]:
    """Pids of live processes for which predicate(pid) is true (it may read command()/environ())."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and predicate(p.pid):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out
