"""The durable outbox: one file per notification under <home>/state/notify/, with per-target marks.

An entry is written whole (daemon/atomic.py, 0600, directory 0700) when the event happens,
before the job's own record is saved, and rewritten after each delivery try with that
target's mark (pending, delivered, abandoned), its tries and when to try next. A daemon
killed at any instant therefore finds, at its next start, every notification it had not
delivered; one delivered but not yet marked is sent again (at least once, not exactly once).

Bounded: a finished entry (every target delivered or abandoned) is kept RATE_WINDOW (the rate
limit counts from these files, so it survives restarts too) and at most MAX_ENTRIES entries
exist; past that the oldest finished go, then the oldest pending that are not a job's end, then
the oldest ends (each dropped one is a notify_failed event).
This module stores; it does not send, decide retries or format text (notifier.py does).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from daemon.atomic import read_json, write_json_atomic

log = logging.getLogger("nanod")
RATE_WINDOW = 3600.0   # s a finished entry stays: the rate limit's memory
MAX_ENTRIES = 300      # on disk, pending and finished together
PENDING, DELIVERED, ABANDONED = "pending", "delivered", "abandoned"


@dataclass
class Target:
    """One place a notification goes: an apprise URL, or the operator's command (run from the config of the day)."""

    key: str                     # "url:<hash>" or "command"
    label: str                   # masked: safe for events and logs
    url: str | None = None
    state: str = PENDING
    tries: int = 0
    next_at: float = 0.0         # unix time of the next try
    error: str = ""              # the last failure
    done_at: float | None = None

    @classmethod
    def for_url(cls, url: str, label: str) -> "Target":
        return cls(key="url:" + hashlib.sha256(url.encode()).hexdigest()[:12], label=label, url=url)


@dataclass
class Entry:
    """One notification: what happened and to whom it goes."""

    id: str
    created_at: float
    event: str
    job: str | None
    title: str                   # one line
    body: str
    notify_type: str = "info"    # apprise's: info, success, warning, failure
    env: dict = field(default_factory=dict)      # NANOD_EVENT ... for the command
    targets: list[Target] = field(default_factory=list)

    @property
    def end(self) -> bool:
        from daemon.notify.events import END_EVENTS
        return self.event in END_EVENTS

    @property
    def finished(self) -> bool:
        return all(t.state != PENDING for t in self.targets)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        tnames = {f.name for f in fields(Target)}
        kw["targets"] = [Target(**{k: v for k, v in t.items() if k in tnames}) for t in d.get("targets") or []]
        return cls(**kw)


class Outbox:
    """The entries of one home, in memory and on disk; safe to use from several threads."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.entries: dict[str, Entry] = {}
        self.lock = threading.RLock()

    def load(self) -> None:
        """Read every entry on disk (an unreadable file is logged and left alone)."""
        self._ensure_dir()
        with self.lock:
            for name in sorted(os.listdir(self.dir)):
                if not name.endswith(".json") or name.startswith("."):
                    continue
                data = read_json(self.dir / name)
                try:
                    entry = Entry.from_dict(data)
                except (TypeError, ValueError, AttributeError):
                    log.warning("notify: cannot read %s: left alone", self.dir / name)
                    continue
                self.entries[entry.id] = entry

    def add(self, entry: Entry) -> None:
        """Write a new entry (the caller prunes)."""
        with self.lock:
            self._ensure_dir()
            self.entries[entry.id] = entry
            self.save(entry)

    def save(self, entry: Entry) -> None:
        with self.lock:
            if self.entries.get(entry.id) is entry:   # one pruned while it was being sent stays gone
                write_json_atomic(self.dir / f"{entry.id}.json", entry.to_dict())

    def due(self, now: float) -> list[tuple[Entry, list[Target]]]:
        """Pending targets whose time has come, oldest entry first."""
        with self.lock:
            out = []
            for e in sorted(self.entries.values(), key=lambda e: e.created_at):
                ts = [t for t in e.targets if t.state == PENDING and t.next_at <= now]
                if ts:
                    out.append((e, ts))
            return out

    def next_due(self) -> float | None:
        with self.lock:
            times = [t.next_at for e in self.entries.values() for t in e.targets if t.state == PENDING]
            return min(times) if times else None

    def recent(self, job: str | None, since: float) -> int:
        """Entries for `job` (None: the daemon's own) created since `since` that were not a job's end."""
        with self.lock:
            return sum(1 for e in self.entries.values() if e.job == job and e.created_at >= since and not e.end)

    def pending(self) -> list[Entry]:
        with self.lock:
            return [e for e in self.entries.values() if not e.finished]

    def prune(self, now: float) -> list[Entry]:
        """Drop what the bounds say; returns the pending entries abandoned to stay within MAX_ENTRIES."""
        with self.lock:
            old = [e for e in self.entries.values() if e.finished and e.created_at < now - RATE_WINDOW]
            for e in old:
                self._remove(e)
            by_age = sorted(self.entries.values(), key=lambda e: e.created_at)
            extra = len(by_age) - MAX_ENTRIES
            abandoned = []
            finished = [e for e in by_age if e.finished]
            pending = [e for e in by_age if not e.finished]
            # finished first, then pending that are not a job's end, then (only a long outage of
            # every target gets here) the oldest ends
            for e in finished + [e for e in pending if not e.end] + [e for e in pending if e.end]:
                if extra <= 0:
                    break
                if not e.finished:
                    abandoned.append(e)
                self._remove(e)
                extra -= 1
            return abandoned

    def _remove(self, e: Entry) -> None:
        self.entries.pop(e.id, None)
        try:
            os.unlink(self.dir / f"{e.id}.json")
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("notify: cannot delete %s: %s", e.id, err)

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)


_last_ns = [0]
_ids_lock = threading.Lock()


def new_id(event: str, job: str | None) -> str:
    """Unique and sortable by time; the job's name is safe in a path (spec.check_name), the event is one of EVENTS."""
    with _ids_lock:
        ns = _last_ns[0] = max(time.time_ns(), _last_ns[0] + 1)
    return f"{ns:019d}-{job or '_'}-{event}"
