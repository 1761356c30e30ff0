"""The daemon (`nanod run`): one tick of named steps in a fixed order, until stopped.

Each tick runs, in this order:

    take_signals      first SIGTERM/SIGINT: warm stop (SIGTERM to each attempt); second: SIGKILL
    take_requests     cancel/retry files from <home>/requests/
    take_inbox        accept (queue) or reject the job files the inbox found stable
    reap_attempts     an attempt that exited: outcome -> supervisor decision -> queue, then retention
    read_progress     new log lines (steps, paused:/resumed:), new complete checkpoints, retention
    detect_stalls     no step and no checkpoint for stall_timeout: stop the group (counts as a crash)
    enforce_deadlines SIGKILL a group that outlived its kill_grace
    relaunch_due      backing_off jobs whose time has come, waiting jobs (GPU lock, disk) again
    start_next        the head of the queue, for each GPU with no current job
    write_heartbeat   state/daemon.json
    notify_watchdog   systemd's watchdog, when it is on

The loop sleeps on a pipe between ticks: the inbox's watcher, signals and
SIGCHLD wake it at once, else it ticks every tick_interval. Signal handlers
only record; the loop acts. All job-state changes go through queue.py; all
process handling through a launcher (daemon/launchers/); all decisions through supervisor.py. The
launch/finish logic of one attempt is in daemon/attempts.py.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time

from daemon import attempts, queue as q
from daemon.atomic import write_json_atomic
from daemon.config import ensure_dirs
from daemon.queue import JobState

log = logging.getLogger("nanod")
S = JobState


class DaemonBusy(RuntimeError):
    """Another daemon holds state/daemon.lock; str() names it."""


# ---- state/daemon.lock -------------------------------------------------------------
def lock_path(settings):
    return settings.state_dir / "daemon.lock"


def try_daemon_lock(settings) -> int | None:
    """The descriptor holding state/daemon.lock (never inherited by attempts), or None if held."""
    from daemon.gpu.lock import try_acquire
    return try_acquire(lock_path(settings))


def daemon_pid(settings) -> int | None:
    """The pid the running daemon wrote into state/daemon.lock."""
    try:
        return int(lock_path(settings).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def take_daemon_lock(settings, wait: float = 2.0) -> int:
    """Hold the home for this daemon; raise DaemonBusy naming the other daemon's pid.

    Waits a little: a CLI command may hold the lock for a moment to change a job.
    """
    deadline = time.monotonic() + wait
    while (fd := try_daemon_lock(settings)) is None:
        if time.monotonic() > deadline:
            pid = daemon_pid(settings)
            who = f"pid {pid}" if pid else "another process"
            raise DaemonBusy(f"another nanod daemon ({who}) is already running on {settings.home}")
        time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ---- waking up ---------------------------------------------------------------------
class Wakeup(threading.Event):
    """An Event the inbox thread can set, backed by a pipe that signals also write to."""

    def __init__(self):
        super().__init__()
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        super().set()
        try:
            os.write(self.w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def sleep(self, timeout: float) -> None:
        if not self.is_set():
            try:
                select.select([self.r], [], [], max(0.0, timeout))
            except InterruptedError:
                pass
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self.clear()

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


def _optional(module: str):
    """One of the modules other rooms provide (health, preflight); None when it is not there."""
    import importlib
    try:
        return importlib.import_module(f"daemon.{module}")
    except ImportError:
        return None


# ---- the daemon --------------------------------------------------------------------
class Daemon:
    def __init__(self, settings):
        self.settings = settings
        self.wakeup = Wakeup()
        self.signals: list[int] = []      # recorded by the handlers, taken by the loop
        self.stopping = False             # a warm stop is under way: start nothing, exit when no attempt lives
        self.lock_fd: int | None = None
        self.queue: q.Queue | None = None
        self.attempts: attempts.Attempts | None = None
        self.inbox = None
        self.health = None
        self.notifier = None
        self.systemd = None
        self.started_at = time.time()
        self._heartbeat_at = 0.0

    # -- start and stop
    def run(self) -> int:
        """Run until stopped; 0 after a warm stop."""
        try:
            self.start()
            while True:
                self.tick()
                if self.stopping and not self.attempts.active:
                    break
                self.wakeup.sleep(self.next_timeout())
        finally:
            self.finish()
        return 0

    def start(self) -> None:
        ensure_dirs(self.settings)
        self.lock_fd = take_daemon_lock(self.settings)
        self._install_signals()
        self.queue = q.Queue(self.settings)
        from daemon.notify.notifier import Notifier
        self.notifier = Notifier(self.settings)   # before recover(): a resumed job is an event too
        self.notifier.attach(self.queue)
        self.notifier.start()
        self.attempts = attempts.Attempts(self.settings, self.queue, _optional("preflight"),
                                          _optional("retention"))
        self.attempts.recover()
        from daemon.inbox import Inbox
        self.inbox = Inbox(self.settings, self.wakeup)
        self.inbox.start()
        health = _optional("health")
        if health is not None and hasattr(health, "HealthMonitor"):
            def on_warning(text: str) -> None:
                q.append_event(self.settings, "health_warning", text)
                self.notifier.health_warning(text)
            self.health = health.HealthMonitor(self.settings, on_warning=on_warning)
            self.health.start()
        from daemon.sdnotify import SystemdNotifier
        self.systemd = SystemdNotifier.from_env()
        q.append_event(self.settings, "daemon_start", f"nanod daemon pid {os.getpid()} started; inbox "
                       f"{self.settings.inbox_dir} ({self.inbox.mode})")
        self.write_heartbeat(force=True)
        self.systemd.ready(self.status_line())
        log.info("nanod: home %s, inbox %s (%s)", self.settings.home, self.settings.inbox_dir, self.inbox.mode)

    def finish(self) -> None:
        if self.systemd is not None:
            self.systemd.stopping("stopping")
        for stop in (self.inbox and self.inbox.stop, self.health and self.health.stop,
                     self.notifier and self.notifier.stop):   # the notifier sends what is due first
            if stop:
                try:
                    stop()
                except Exception:  # a side module must not keep the daemon from stopping
                    log.exception("nanod: error while stopping")
        if self.queue is not None:
            q.append_event(self.settings, "daemon_stop", f"nanod daemon pid {os.getpid()} stopped")
            self.write_heartbeat(force=True, stopped=True)
        signal.set_wakeup_fd(-1)
        self.wakeup.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.wakeup.w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so an exit writes the wakeup pipe
        signal.signal(signal.SIGHUP, signal.SIG_IGN)   # a closed ssh session must not stop training

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)  # only record: the loop acts

    # -- the tick
    def tick(self) -> None:
        """One pass of the named steps, in the order of the module docstring."""
        for step in (self.take_signals, self.take_requests, self.take_inbox, self.reap_attempts,
                     self.read_progress, self.detect_stalls, self.enforce_deadlines, self.relaunch_due,
                     self.start_next, self.write_heartbeat, self.notify_watchdog):
            try:
                step()
            except Exception:  # one failing step must not take training down with it
                log.exception("nanod: tick step %s failed", step.__name__)

    def take_signals(self) -> None:
        taken, self.signals[:] = list(self.signals), []
        for signum in taken:
            if not self.stopping:
                self.stopping = True
                log.info("nanod: %s: stopping gracefully (again to kill)", signal.Signals(signum).name)
                self.attempts.stop_all()
            else:
                log.info("nanod: %s again: killing the attempts", signal.Signals(signum).name)
                self.attempts.kill_all()

    def take_requests(self) -> None:
        for req in q.take_requests(self.settings):
            self.attempts.apply_request(req)

    def take_inbox(self) -> None:
        for result in self.inbox.take():
            if result.error is not None:
                q.append_event(self.settings, "rejected", result.error, file=result.path.name)
                continue
            spec = result.spec
            try:
                self.queue.add(spec, source=result.path.name)
            except q.DuplicateJob as e:
                existing = self.queue.get(spec.name)
                if existing.source == result.path.name and existing.spec == spec.model_dump(mode="json"):
                    # the very file that job came from: a daemon that died between queueing it and
                    # moving it out of the inbox (or the same file dropped again) is not a new job
                    self.inbox.accept(result.path, spec.name)
                    q.append_event(self.settings, "accepted", f"{result.path.name} is job {spec.name}'s own file, "
                                   f"already {existing.state.value}", job=spec.name, file=result.path.name)
                    continue
                self.inbox.reject(result.path, str(e))
                q.append_event(self.settings, "rejected", str(e), file=result.path.name, job=spec.name)
                continue
            self.inbox.accept(result.path, spec.name)
            q.append_event(self.settings, "accepted", f"job {spec.name} queued from {result.path.name}",
                           job=spec.name, file=result.path.name)

    def reap_attempts(self) -> None:
        self.attempts.reap()

    def read_progress(self) -> None:
        self.attempts.read_progress()

    def detect_stalls(self) -> None:
        self.attempts.detect_stalls()

    def enforce_deadlines(self) -> None:
        self.attempts.enforce_deadlines()

    def relaunch_due(self) -> None:
        if not self.stopping:
            self.attempts.relaunch_due()

    def start_next(self) -> None:
        if not self.stopping:
            self.attempts.start_next()

    def write_heartbeat(self, force: bool = False, stopped: bool = False) -> None:
        now = time.time()
        if not force and now - self._heartbeat_at < min(1.0, self.settings.tick_interval):
            return
        self._heartbeat_at = now
        info = {"pid": os.getpid(), "started_at": self.started_at, "heartbeat_at": now,
                "version": _version(), "home": str(self.settings.home), "inbox": str(self.settings.inbox_dir),
                "inbox_mode": self.inbox.mode if self.inbox else None,
                "inbox_mode_reason": self.inbox.mode_reason if self.inbox else ""}
        if stopped:
            info["stopped_at"] = now
        write_json_atomic(self.settings.state_dir / "daemon.json", info)

    def notify_watchdog(self) -> None:
        self.systemd.watchdog()
        line = self.status_line()
        if line != getattr(self, "_last_status", None):
            self._last_status = line
            self.systemd.status(line)

    # -- helpers
    def next_timeout(self) -> float:
        timeout = self.settings.tick_interval
        due = self.attempts.next_due()
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.time()))
        return timeout

    def status_line(self) -> str:
        for rec in self.queue.ordered(S.RUNNING, S.PAUSED, S.WAITING, S.BACKING_OFF):
            return f"{rec.name}: {rec.state.value}: {rec.reason}"
        n = len(self.queue.ordered(S.QUEUED))
        return f"idle, {n} queued" if n else "idle"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("nanod")
    except Exception:
        return "0"


def run_daemon(settings) -> int:
    return Daemon(settings).run()


# ---- job changes from the CLI ------------------------------------------------------
def daemon_running(settings) -> bool:
    """Whether a daemon holds this home's state/daemon.lock."""
    from daemon.gpu.lock import is_held
    return is_held(lock_path(settings))


def change_job(settings, action: str, name: str, *, wait: float = 5.0) -> str:
    """cancel/retry a job: through a request file when a daemon runs, else directly under state/daemon.lock.

    Returns a line for the user; raises ValueError with one when the change makes no sense.
    """
    rec = q.load_job(settings, name)
    if rec is None:
        raise ValueError(f"no job named {name!r} in {settings.home}")
    if action == "cancel" and rec.finished:
        raise ValueError(f"job {name} is already {rec.state.value}")
    if action == "retry" and rec.state not in (S.FAILED, S.CANCELLED):
        raise ValueError(f"job {name} is {rec.state.value}; only a failed or cancelled job can be retried")
    ensure_dirs(settings)
    fd = try_daemon_lock(settings)
    if fd is None:  # a daemon runs: it applies the request on its next tick
        path = q.write_request(settings, action, name)
        deadline = time.monotonic() + wait
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if path.exists():
            return f"{action} of {name} requested; the daemon has not taken it yet"
        if action == "cancel" and (r := q.load_job(settings, name)) and not r.finished:
            return f"cancelling {name}: the trainer is saving and stopping"
        return f"{action} of {name} done"
    try:
        queue = q.Queue(settings)
        rec = queue.get(name)
        if action == "retry":
            queue.retry(rec)
            return f"{name} requeued; it resumes from its last checkpoint when a daemon runs"
        _stop_orphan(settings, rec)
        queue.end_attempt(rec, outcome="cancelled", exit_code=None, error="cancelled with no daemon running")
        queue.transition(rec, S.CANCELLED, "cancelled by request (no daemon was running)", kind="cancelled")
        return f"{name} cancelled"
    finally:
        os.close(fd)


def _stop_orphan(settings, rec) -> None:
    """An attempt left alive by a dead daemon is stopped like a cancel: SIGTERM, SIGKILL after kill_grace."""
    from daemon.launchers import launcher_for
    from daemon.launchers.local import wait_gone
    att = rec.last_attempt
    if att is None or att.ended_at is not None or not (att.pid or att.slurm):
        return
    proc = launcher_for(settings, rec.job_spec).adopt(rec, att)
    if proc is None:
        return
    proc.terminate()
    if not wait_gone(proc, rec.job_spec.recovery.kill_grace):
        proc.kill()
        wait_gone(proc, 5.0)
