"""Claims about the GPU lock (daemon/gpu/lock.py) and `nanod exec`: real processes, real flocks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import filelock

from daemon.gpu import lock as gpulock
from tests.conftest import PYTHON, wait_until

HOLD_THEN_SPAWN = textwrap.dedent("""
    import subprocess, sys, time
    from daemon.gpu import lock as gpulock
    path = sys.argv[1]
    fd = gpulock.try_acquire(path)
    assert fd is not None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(fd,))
    gpulock.write_holder(path, pid=child.pid, command="sleeper for the test", job="j", home="/h")
    gpulock.release(fd)
    print(child.pid, flush=True)
    time.sleep(60)
""")


def test_the_lock_lives_as_long_as_the_child_even_when_the_taker_is_sigkilled(tmp_path):
    path = tmp_path / "gpu0.lock"
    taker = subprocess.Popen([PYTHON, "-c", HOLD_THEN_SPAWN, str(path)], stdout=subprocess.PIPE, text=True)
    child = int(taker.stdout.readline())
    try:
        assert gpulock.is_held(path)
        taker.kill()
        taker.wait()
        assert gpulock.is_held(path), "the child's inherited descriptor must keep the lock"
        assert gpulock.try_acquire(path) is None
        who = gpulock.describe_holder(path)
        assert f"pid {child}" in who and "sleeper for the test" in who
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: not gpulock.is_held(path), 5, message="the lock to be released with the child")
        assert path.exists(), "the lock file stays (waiters share its inode)"
    finally:
        for pid in (child,):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_our_lock_and_filelock_exclude_each_other(tmp_path):
    path = tmp_path / "gpu0.lock"
    fd = gpulock.try_acquire(path)
    assert fd is not None
    other = filelock.FileLock(str(path), timeout=0)
    try:
        other.acquire()
        raise AssertionError("filelock acquired a lock we hold")
    except filelock.Timeout:
        pass
    gpulock.release(fd)
    with filelock.FileLock(str(path), timeout=0):
        assert gpulock.try_acquire(path) is None
    assert gpulock.is_held(path) is False


def test_a_holder_that_is_not_nanod_is_named_from_proc_locks(tmp_path):
    path = tmp_path / "gpu0.lock"
    code = "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); print('ok', flush=True); time.sleep(60)"
    other = subprocess.Popen([PYTHON, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ok"
        assert f"pid {other.pid}" in gpulock.describe_holder(path)
    finally:
        other.kill()
        other.wait()


def nanod(*args, **kw):
    return subprocess.run([PYTHON, "-m", "daemon.cli", *args], capture_output=True, text=True, timeout=60, **kw)


def test_exec_runs_the_command_under_the_lock_and_passes_its_exit_code_on(nanod_home, tmp_path):
    lock = tmp_path / "locks" / "gpu0.lock"
    probe = f"import sys; from daemon.gpu import lock; sys.exit(7 if lock.is_held({str(lock)!r}) else 1)"
    r = nanod("exec", "--", PYTHON, "-c", probe)
    assert r.returncode == 7, r.stderr
    assert not gpulock.is_held(lock)


def test_exec_waits_for_the_holder_and_times_out_naming_it(nanod_home, tmp_path):
    lock = tmp_path / "locks" / "gpu1.lock"
    fd = gpulock.try_acquire(lock)
    try:
        gpulock.write_holder(lock, pid=os.getpid(), command="the test itself")
        r = nanod("exec", "--gpu", "1", "--timeout", "0.3", "--", "true")
        assert r.returncode == 1
        assert f"pid {os.getpid()}" in r.stderr and "the test itself" in r.stderr
    finally:
        gpulock.release(fd)
    assert nanod("exec", "--gpu", "1", "--", sys.executable, "-c", "raise SystemExit(3)").returncode == 3
