"""The inbox: watches `jobs/` for YAML plans and turns each stable file into a
JobSpec or a one-line rejection.

How a file is noticed:
- inotify (watchdog's observer): a file renamed in or closed after writing is
  ready at once; a file created or modified but not yet closed is being written
  and waits for its close.
- polling (where inotify hears nothing: WSL2's /mnt/c, network filesystems, or a
  failed probe): a stat scan every poll_interval; a file is read once it has been
  unchanged (inode, size, mtime, ctime) for settle_time.
- a full rescan every rescan_interval in both modes, because inotify drops events
  when its queue overflows. A file found by a scan alone settles like a polled one.

Promise 8: any file is survived. What may be opened and how much is read is
daemon/inbox_files.py's; the YAML is checked for bombs before it is built
(daemon/spec.py); a bug in either costs one file, never the daemon. A job
its trainer would refuse (daemon.trainers.check_job: for nanochat a flag its
script does not have, a checkout the operator has not allowed) is rejected
here too, not after hours of an earlier phase. A rejection writes
`<file>.rejected` (one line, 0600) beside the file, which stays; editing the
file makes it read again.
Promise 12: an inbox writable by other users is refused at start.

This module decides nothing about jobs: duplicate names against existing jobs,
queueing and starting are the daemon's (it calls accept() or reject()).
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEventHandler

from daemon.atomic import fsync_dir, write_bytes_atomic
from daemon.config import Settings
from daemon.inbox_files import (SILENT_FILESYSTEMS, FileChanged, InboxError, Signature, check_inbox_dir,
                                filesystem_type, read_regular_file, signature)
from daemon.spec import JobFileError, JobSpec, check_name, one_line, parse_job_bytes
from daemon.trainers import check_job

log = logging.getLogger(__name__)
# watchdog logs this at ERROR when its reader thread wakes during a normal stop: noise in every shutdown
logging.getLogger("watchdog.observers.inotify").addFilter(
    lambda record: "called when the thread is inactive" not in record.getMessage())

PROBE_TIMEOUT = 1.0         # auto mode: how long the start-up probe file waits for its inotify event
STALE_WRITER_AFTER = 120.0  # a file opened for writing whose close event never came (lost) is read after this
REJECTED_SUFFIX = ".rejected"

__all__ = ["Inbox", "InboxError", "InboxResult", "is_candidate"]


@dataclass(frozen=True)
class InboxResult:
    path: Path
    spec: JobSpec | None = None   # exactly one of spec and error is set
    error: str | None = None      # the one-line reason, also written to <file>.rejected


@dataclass
class _Seen:
    """What take() knows about one file name (owned by the thread that calls take)."""

    sig: Signature
    since: float                 # monotonic time this signature was first seen
    event: str | None = None     # "ready" (closed / renamed in), "writing" (open), None (found by a scan)


def is_candidate(name: str) -> bool:
    """*.yaml / *.yml, any case, not hidden (editors' and our own temp files), not a marker."""
    low = name.lower()
    return not name.startswith(".") and (low.endswith(".yaml") or low.endswith(".yml"))


class Inbox:
    """Watches settings.inbox_dir; take() hands over files that became stable."""

    def __init__(self, settings: Settings, wake: threading.Event, *,
                 observer_factory: Callable[[], object] | None = None):
        self.settings = settings
        self.dir = Path(settings.inbox_dir)
        self.wake = wake
        forced = settings.inbox_mode == "polling"
        self.mode = "polling" if forced else "inotify"   # "inotify" | "polling"
        self.mode_reason = f"inbox_mode is polling; polling every {settings.poll_interval:g}s" if forced else ""
        self._observer_factory = observer_factory or _inotify_observer
        self._observer = None
        self._lock = threading.Lock()          # guards _events and _rescan_due (watcher threads write them)
        self._events: dict[str, str | None] = {}
        self._rescan_due = True                # the first take() looks at everything already there
        self._probe_name = ""
        self._probe_seen = threading.Event()
        self._seen: dict[str, _Seen] = {}
        self._handled: dict[str, Signature] = {}  # name -> the version already returned (or rejected)
        self._raw: dict[str, tuple[Signature, bytes]] = {}  # bytes of returned specs, for accept()
        self._claimed: dict[str, str] = {}      # job name -> file name, returned and not yet accepted/rejected
        self._settle_due: float | None = None
        self._kick = threading.Event()
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None

    # ---- start and stop --------------------------------------------------------------
    def start(self) -> None:
        check_inbox_dir(self.dir)
        if self.settings.inbox_mode != "polling":
            self._start_inotify()
        self._stopping.clear()
        self._ticker = threading.Thread(target=self._tick_forever, name="nanod-inbox", daemon=True)
        self._ticker.start()
        self.wake.set()  # files already there
        log.info("inbox %s: %s%s", self.dir, self.mode, f" ({self.mode_reason})" if self.mode_reason else "")

    def stop(self) -> None:
        self._stopping.set()
        self._kick.set()
        if self._observer is not None:
            _stop_observer(self._observer)
            self._observer = None
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None

    def _start_inotify(self) -> None:
        auto = self.settings.inbox_mode == "auto"
        fstype = filesystem_type(self.dir) if auto else ""
        if fstype in SILENT_FILESYSTEMS:
            return self._fall_back(f"the inbox is on a {fstype} filesystem, where changes made from elsewhere "
                                   "raise no inotify events")
        try:
            observer = self._observer_factory()
            observer.schedule(_EventHandler(self), str(self.dir), recursive=False)
            observer.start()
        except (OSError, RuntimeError) as e:
            if not auto:
                raise InboxError(f"inbox {self.dir}: inotify cannot start ({_describe(e)}); "
                                 "set inbox_mode = \"polling\"") from None
            return self._fall_back(f"inotify cannot start ({_describe(e)})")
        self._observer = observer
        if auto and not self._probe():
            _stop_observer(observer)
            self._observer = None
            self._fall_back(f"inotify delivered no event for a probe file within {PROBE_TIMEOUT:g}s")

    def _fall_back(self, why: str) -> None:
        self.mode = "polling"
        self.mode_reason = f"{why}; polling every {self.settings.poll_interval:g}s"
        log.warning("inbox %s: %s", self.dir, self.mode_reason)

    def _probe(self) -> bool:
        """Write a hidden file and wait for its event: is inotify heard here at all?"""
        self._probe_seen.clear()
        self._probe_name = f".nanod-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self.dir / self._probe_name
        try:
            path.write_bytes(b"probe\n")
            return self._probe_seen.wait(PROBE_TIMEOUT)
        except OSError as e:
            log.warning("inbox %s: probe file: %s", self.dir, e)
            return False
        finally:
            path.unlink(missing_ok=True)

    # ---- what the watchers report (watchdog's and the ticker's threads) --------------
    def note_event(self, name: str, kind: str | None) -> None:
        """A watcher saw `name` change: "ready", "writing", or None (look at it)."""
        if name == self._probe_name:
            self._probe_seen.set()
            return
        if not is_candidate(name):
            return
        with self._lock:
            self._events[name] = kind if kind is not None else self._events.get(name)
        self.wake.set()

    def _tick_forever(self) -> None:
        """Polls (in polling mode), schedules rescans, and wakes the daemon when a settling file is due."""
        now = time.monotonic()
        next_poll = now + self.settings.poll_interval
        next_rescan = now + self.settings.rescan_interval
        listing = self._list_signatures() if self.mode == "polling" else {}
        while not self._stopping.is_set():
            now = time.monotonic()
            if self.mode == "polling" and now >= next_poll:
                fresh = self._list_signatures()
                for name in fresh.keys() | listing.keys():
                    if fresh.get(name) != listing.get(name):
                        self.note_event(name, None)
                listing, next_poll = fresh, now + self.settings.poll_interval
            if now >= next_rescan:
                with self._lock:
                    self._rescan_due = True
                self.wake.set()
                next_rescan = now + self.settings.rescan_interval
            due = self._settle_due
            if due is not None and now >= due:
                self._settle_due = None
                self.wake.set()
            deadlines = [next_rescan] + ([next_poll] if self.mode == "polling" else [])
            deadlines += [self._settle_due] if self._settle_due is not None else []
            self._kick.wait(max(0.01, min(deadlines) - time.monotonic()))
            self._kick.clear()

    def _list_signatures(self) -> dict[str, Signature]:
        out = {}
        try:
            with os.scandir(self.dir) as it:
                for entry in it:
                    if is_candidate(entry.name):
                        try:
                            out[entry.name] = signature(entry.stat(follow_symlinks=False))
                        except OSError:
                            pass
        except OSError as e:
            log.warning("inbox %s: cannot list: %s", self.dir, e)
        return out

    # ---- take --------------------------------------------------------------------------
    def take(self) -> list[InboxResult]:
        """Files that became stable since the last call, parsed and validated. Never raises for a file."""
        with self._lock:
            events, self._events = self._events, {}
            rescan, self._rescan_due = self._rescan_due, False
        names = set(events) | set(self._seen)
        if rescan:
            names |= set(self._list_signatures())
            self._remove_orphan_markers()
        now = time.monotonic()
        ready: list[tuple[int, str, os.stat_result]] = []
        next_due = None
        for name in names:
            st = self._observe(name, events.get(name), now)
            if st is None:
                continue
            due = self._due_at(name, st, now)
            if due is None:
                ready.append((st.st_mtime_ns, name, st))
            else:
                next_due = due if next_due is None else min(next_due, due)
        results = []
        for _, name, st in sorted(ready):  # oldest first: of two files with one job name, the first dropped wins
            result = self._read(name, st)
            if result is not None:
                results.append(result)
        self._settle_due = next_due
        if next_due is not None:
            self._kick.set()
        return results

    def _observe(self, name: str, event: str | None, now: float) -> os.stat_result | None:
        """lstat `name` and update what is known of it; None when there is nothing to do."""
        if not is_candidate(name):
            return None
        try:
            st = os.lstat(self.dir / name)
        except OSError:  # gone (accepted, deleted, renamed away)
            self._forget(name)
            return None
        sig = signature(st)
        if self._handled.get(name) == sig:
            self._seen.pop(name, None)
            return None
        if name not in self._handled and self._has_fresh_marker(name, st):
            self._handled[name] = sig  # rejected before a restart and unchanged since
            self._seen.pop(name, None)
            return None
        seen = self._seen.get(name)
        if seen is None or seen.sig != sig:
            # a file being written stays so until its close event, even if that change's event is still in flight
            seen = self._seen[name] = _Seen(sig, now, "writing" if seen and seen.event == "writing" else None)
        if event is not None:
            seen.event = event
        return st

    def _due_at(self, name: str, st: os.stat_result, now: float) -> float | None:
        """None when the file can be read now, else when to look again."""
        seen = self._seen[name]
        if not stat.S_ISREG(st.st_mode):
            return None  # rejected without waiting: it will never have a close event
        if seen.event == "ready" and st.st_size > 0:
            return None  # (an empty file may be `touch`ed before it is written: that one settles)
        wait = STALE_WRITER_AFTER if seen.event == "writing" else self.settings.settle_time
        due = seen.since + wait
        return None if now >= due else due

    def _read(self, name: str, st: os.stat_result) -> InboxResult | None:
        path = self.dir / name
        try:
            raw, sig = read_regular_file(path, st)
        except FileNotFoundError:
            self._forget(name)
            return None
        except FileChanged:
            return None  # written to while we read: the next event or settle reads it again
        except JobFileError as e:
            return self._reject_now(path, str(e), signature(st))
        try:
            spec = parse_job_bytes(raw, filename=name)
            check_job(spec, self.settings)  # reads a nanochat checkout's scripts (never imports them)
        except JobFileError as e:
            return self._reject_now(path, str(e), sig)
        except (ValueError, OSError) as e:  # the trainer's refusal: a flag its script does not have, ...
            return self._reject_now(path, f"{name}: {e}", sig)
        except Exception as e:  # a parser bug must cost one file, not the daemon (promise 8)
            log.exception("inbox: reading %s", name)
            return self._reject_now(path, f"{name}: cannot be read as a job ({type(e).__name__}: {e})", sig)
        other = self._claimed.get(spec.name)
        if other is not None and other != name and (self.dir / other).exists():
            return self._reject_now(path, f"{name}: job name {spec.name!r} is also used by {other} "
                                          "in the inbox; names must be unique", sig)
        self._claimed[spec.name] = name
        self._handled[name] = sig
        self._seen.pop(name, None)
        self._raw[name] = (sig, raw)
        return InboxResult(path=path, spec=spec)

    def _reject_now(self, path: Path, reason: str, sig: Signature) -> InboxResult:
        reason = one_line(reason)
        self._write_marker(path, reason)
        self._handled[path.name] = sig
        self._seen.pop(path.name, None)
        log.info("inbox: rejected %s", reason)
        return InboxResult(path=path, error=reason)

    def _forget(self, name: str) -> None:
        self._seen.pop(name, None)
        self._handled.pop(name, None)
        self._raw.pop(name, None)
        for job, file in list(self._claimed.items()):
            if file == name:
                del self._claimed[job]

    # ---- accept and reject (the daemon's decisions) ---------------------------------------
    def accept(self, path: Path, name: str) -> Path:
        """Move the file's validated bytes to <state_dir>/accepted/<name>.yaml; returns that path."""
        path = Path(path)
        check_name(name)
        dest_dir = self.settings.state_dir / "accepted"
        dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        dest = dest_dir / f"{name}.yaml"
        kept = self._raw.pop(path.name, None)
        if kept is None:  # not from take(): read it the careful way
            raw, sig = read_regular_file(path, os.lstat(path))
        else:
            sig, raw = kept
        # the bytes that were validated are what is kept, whatever the file holds now
        write_bytes_atomic(dest, raw)
        try:
            if signature(os.lstat(path)) == sig:
                os.unlink(path)
                fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        Path(str(path) + REJECTED_SUFFIX).unlink(missing_ok=True)
        self._release(path.name)
        return dest

    def reject(self, path: Path, reason: str) -> None:
        """Write <file>.rejected (one line) beside the file; the file stays until it is edited or removed."""
        path = Path(path)
        reason = one_line(reason)
        self._write_marker(path, reason)
        kept = self._raw.pop(path.name, None)
        if kept is not None:
            self._handled[path.name] = kept[0]
        self._release(path.name)

    def _release(self, name: str) -> None:
        for job, file in list(self._claimed.items()):
            if file == name:
                del self._claimed[job]

    def _write_marker(self, path: Path, reason: str) -> None:
        try:
            write_bytes_atomic(Path(str(path) + REJECTED_SUFFIX), (reason + "\n").encode())
        except OSError as e:  # the inbox may be read-only: the reason still reaches status
            log.warning("inbox: cannot write %s%s: %s", path.name, REJECTED_SUFFIX, e)

    def _has_fresh_marker(self, name: str, st: os.stat_result) -> bool:
        """A .rejected newer than the file's last change: it was rejected before a daemon restart."""
        try:
            marker = os.lstat(self.dir / (name + REJECTED_SUFFIX))
        except OSError:
            return False
        return stat.S_ISREG(marker.st_mode) and marker.st_mtime_ns >= st.st_ctime_ns

    def _remove_orphan_markers(self) -> None:
        """A .rejected whose file is gone says nothing any more."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        present = set(names)
        for n in names:
            if n.endswith(REJECTED_SUFFIX) and n[: -len(REJECTED_SUFFIX)] not in present:
                try:
                    os.unlink(self.dir / n)
                except OSError:
                    pass


# ---- watchdog glue -------------------------------------------------------------------------
def _inotify_observer():
    from watchdog.observers.inotify import InotifyObserver
    # full events: a file renamed in from outside the inbox arrives as a move (ready),
    # not as a create (which would mean "opened for writing, wait for the close")
    return InotifyObserver(generate_full_events=True)


def _stop_observer(observer) -> None:
    try:
        observer.stop()
        observer.join(timeout=5)
    except Exception as e:  # a watcher that will not stop must not stop the daemon
        log.warning("inbox: stopping the watcher: %s", e)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == 28:
        return "the inotify watch limit is reached; raise fs.inotify.max_user_watches"
    if isinstance(e, OSError) and e.errno == 24:
        return "the inotify instance limit is reached; raise fs.inotify.max_user_instances"
    return one_line(str(e) or type(e).__name__, 200)


class _EventHandler(FileSystemEventHandler):
    """Turns watchdog events into note_event(name, kind) calls."""

    def __init__(self, inbox: Inbox):
        super().__init__()
        self.inbox = inbox

    def dispatch(self, event) -> None:
        kind = event.event_type  # created, modified, closed, moved, deleted, opened, closed_no_write, attrib
        src = os.path.basename(os.fsdecode(event.src_path)) if event.src_path else ""
        if kind == "moved":
            dest = os.path.basename(os.fsdecode(event.dest_path)) if event.dest_path else ""
            if src:
                self.inbox.note_event(src, None)
            if dest:
                self.inbox.note_event(dest, None if event.is_directory else "ready")
        elif kind == "closed":
            self.inbox.note_event(src, "ready")
        elif kind in ("created", "modified") and not event.is_directory:
            self.inbox.note_event(src, "writing")
        elif kind in ("created", "deleted", "attrib"):
            self.inbox.note_event(src, None)
