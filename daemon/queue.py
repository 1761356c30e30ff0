"""Durable job state: the one module that changes a job's state.

A job's state is `JobState` (one str Enum) and it moves only through
`Queue.transition`, which refuses a move that `TRANSITIONS` does not list.
Each job is one record, `<home>/state/jobs/<name>.json` (schema 1 in
docs/architecture.md), written whole (daemon/atomic.py, 0600) after every
change, so a daemon killed at any instant restarts with the queue in order
and every attempt it had started on record. Global events (rejected files,
daemon start/stop) go to `state/events.jsonl`, bounded.

Readers (`nanod status`, health, retention) use `load_job` / `list_jobs` or
read the JSON themselves; they never write. Runtime handles (processes, log
offsets) are not here: they live in the loop and are never written to disk.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

from daemon.atomic import read_json, write_json_atomic
from daemon.spec import JobSpec, check_name

log = logging.getLogger("nanod")
SCHEMA = 1
MAX_EVENTS = 200          # per job record
MAX_LOSSES = 200          # (step, loss) pairs kept in progress.losses
GLOBAL_EVENTS_KEEP = 500  # lines kept when events.jsonl is trimmed
GLOBAL_EVENTS_MAX_BYTES = 256 * 1024


class JobState(str, Enum):
    QUEUED = "queued"            # waiting its turn
    WAITING = "waiting"          # its turn, but the GPU lock or disk space is not there yet (or its SLURM job pends)
    RUNNING = "running"          # an attempt is alive
    BACKING_OFF = "backing_off"  # between attempts: relaunch at next_attempt_at
    PAUSED = "paused"            # the attempt lives but said it is paused (disk space)
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobState
# Every legal move. A non-finished state may also "move" to itself to change its reason.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.WAITING, S.RUNNING, S.FAILED, S.CANCELLED}),
    S.WAITING: frozenset({S.RUNNING, S.QUEUED, S.FAILED, S.CANCELLED}),
    # running/paused -> waiting: SLURM requeued the attempt's batch job, which pends until it runs again
    S.RUNNING: frozenset({S.PAUSED, S.WAITING, S.BACKING_OFF, S.QUEUED, S.DONE, S.FAILED, S.CANCELLED}),
    S.PAUSED: frozenset({S.RUNNING, S.WAITING, S.BACKING_OFF, S.QUEUED, S.DONE, S.FAILED, S.CANCELLED}),
    S.BACKING_OFF: frozenset({S.RUNNING, S.WAITING, S.QUEUED, S.FAILED, S.CANCELLED}),
    S.DONE: frozenset(),
    S.FAILED: frozenset({S.QUEUED}),      # nanod retry
    S.CANCELLED: frozenset({S.QUEUED}),   # nanod retry
}
FINISHED = frozenset({S.DONE, S.FAILED, S.CANCELLED})
ATTEMPT_ALIVE = frozenset({S.RUNNING, S.PAUSED})  # states in which an attempt process may live


class IllegalTransition(RuntimeError):
    pass


class DuplicateJob(ValueError):
    """A job of that name exists and is not finished; str() is the one-line reason."""


@dataclass
class Attempt:
    """One launch of one phase."""

    n: int
    phase: str
    pid: int | None = None
    pgid: int | None = None
    proc_start: int | None = None      # /proc/<pid>/stat starttime: tells a reused pid apart
    started_at: float = 0.0
    ended_at: float | None = None
    outcome: str | None = None         # daemon.trainers.Outcome value once ended
    exit_code: int | None = None
    resumed_from: int | None = None
    init_from: int | None = None
    device_batch_size: int | None = None
    log: str = ""                      # relative to home
    first_step: int | None = None
    last_step: int | None = None
    error: str = ""
    # on SLURM: {"job_id", "name", "state", "reason", "node", "restarts", "since", "script"} (launchers/slurm.py)
    slurm: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Attempt":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class JobRecord:
    """One job, as written to state/jobs/<name>.json (field names are the JSON keys)."""

    name: str
    seq: int
    spec: dict
    priority: int = 0
    state: JobState = JobState.QUEUED
    state_since: float = 0.0
    reason: str = ""
    submitted_at: float = 0.0
    source: str = ""
    phase_index: int = 0
    phase_final_steps: dict = field(default_factory=dict)
    device_batch_size: dict = field(default_factory=dict)
    restarts_without_progress: int = 0
    next_attempt_at: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    progress: dict | None = None
    checkpoint: dict | None = None
    events: list[dict] = field(default_factory=list)
    schema: int = SCHEMA

    @property
    def job_spec(self) -> JobSpec:
        cached = self.__dict__.get("_spec_cache")
        if cached is None or cached[0] is not self.spec:
            cached = (self.spec, JobSpec.model_validate(self.spec))
            self.__dict__["_spec_cache"] = cached
        return cached[1]

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def last_attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def phase(self) -> str | None:
        phases = self.spec.get("phases") or []
        return phases[self.phase_index]["phase"] if self.phase_index < len(phases) else None

    def to_dict(self) -> dict:
        d = {"schema": self.schema}
        for f in fields(self):
            if f.name == "schema":
                continue
            v = getattr(self, f.name)
            if f.name == "state":
                v = JobState(v).value
            elif f.name == "attempts":
                v = [asdict(a) for a in v]
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "JobRecord":
        """A record from its JSON; unknown keys are ignored, missing ones take defaults."""
        if not isinstance(d, dict):
            raise ValueError("a job record must be a JSON object")
        if int(d.get("schema", 1)) > SCHEMA:
            raise ValueError(f"job record schema {d.get('schema')} is newer than this nanod ({SCHEMA})")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["state"] = JobState(kw.get("state", "queued"))
        kw["attempts"] = [Attempt.from_dict(a) for a in kw.get("attempts") or [] if isinstance(a, dict)]
        kw["schema"] = SCHEMA
        for key in ("phase_final_steps", "device_batch_size"):
            kw[key] = dict(kw.get(key) or {})
        kw["events"] = list(kw.get("events") or [])
        return cls(**kw)

    # records read like their JSON too: rec["state"] == "running"
    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


# ---- readers -----------------------------------------------------------------------
def jobs_dir(settings) -> Path:
    return settings.state_dir / "jobs"


def record_path(settings, name: str) -> Path:
    return jobs_dir(settings) / f"{check_name(name, 'job name')}.json"


def load_job(settings, name: str) -> JobRecord | None:
    """The record of one job, or None when there is none (or it cannot be read)."""
    try:
        path = record_path(settings, name)
    except ValueError:
        return None
    data = read_json(path)
    if data is None:
        return None
    try:
        return JobRecord.from_dict(data)
    except (ValueError, TypeError, KeyError):
        return None


def list_jobs(settings) -> list[JobRecord]:
    """Every readable record, in queue order: priority high to low, then seq."""
    out = []
    try:
        names = sorted(os.listdir(jobs_dir(settings)))
    except FileNotFoundError:
        return []
    for fname in names:
        if fname.endswith(".json") and not fname.startswith("."):
            rec = load_job(settings, fname[:-5])
            if rec is not None:
                out.append(rec)
    return sorted(out, key=queue_key)


def queue_key(rec: JobRecord) -> tuple:
    return (-rec.priority, rec.seq)


# ---- global events -----------------------------------------------------------------
_events_lock = threading.Lock()


def append_event(settings, kind: str, message: str, *, job: str | None = None, file: str | None = None) -> dict:
    """Add one line to state/events.jsonl (trimmed to the last lines when it grows)."""
    ev = {"at": time.time(), "kind": kind}
    if job:
        ev["job"] = job
    if file:
        ev["file"] = file
    ev["message"] = one_line(message)
    path = settings.state_dir / "events.jsonl"
    line = (json.dumps(ev) + "\n").encode()
    with _events_lock:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > GLOBAL_EVENTS_MAX_BYTES:
            _trim_events(path)
    return ev


def _trim_events(path: Path) -> None:
    from daemon.atomic import write_bytes_atomic
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except OSError:
        return
    write_bytes_atomic(path, b"".join(lines[-GLOBAL_EVENTS_KEEP:]))


def one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- the writer --------------------------------------------------------------------
class Queue:
    """The durable queue of one home. Only one process writes it at a time (state/daemon.lock)."""

    def __init__(self, settings):
        self.settings = settings
        jobs_dir(settings).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.records: dict[str, JobRecord] = {r.name: r for r in list_jobs(settings)}
        # called as observe(rec, event) for every job event, before the record is saved (the
        # notifier writes its outbox there, so a kill -9 right after a job's end loses no message)
        self.observers: list = []

    # -- reading
    def get(self, name: str) -> JobRecord | None:
        return self.records.get(name)

    def ordered(self, *states: JobState) -> list[JobRecord]:
        recs = sorted(self.records.values(), key=queue_key)
        return [r for r in recs if not states or r.state in states]

    # -- the one function that changes a job's state
    def transition(self, rec: JobRecord, new: JobState, reason: str = "", *, kind: str | None = None,
                   attempt: int | None = None) -> None:
        """Move `rec` to `new` (or keep its state with a new reason), record an event, save."""
        new = JobState(new)
        same = new == rec.state
        if same and rec.state in FINISHED:
            raise IllegalTransition(f"job {rec.name}: already {rec.state.value}")
        if not same and new not in TRANSITIONS[rec.state]:
            raise IllegalTransition(f"job {rec.name}: {rec.state.value} -> {new.value} is not allowed")
        reason = one_line(reason)
        if same and reason == rec.reason and kind is None:
            return
        if not same:
            rec.state_since = time.time()
        rec.state = new
        rec.reason = reason
        if new != JobState.BACKING_OFF:
            rec.next_attempt_at = None
        if kind or not same:
            self._event(rec, kind or new.value, reason or new.value, attempt)
        self.save(rec)

    # -- other changes, each saved whole
    def add(self, spec: JobSpec, source: str = "") -> JobRecord:
        """Queue a new job at the tail of its priority. A finished job of the same name is replaced."""
        old = self.records.get(spec.name)
        if old is not None and not old.finished:
            raise DuplicateJob(f"a job named {spec.name!r} is already {old.state.value}; "
                               f"cancel it or choose another name")
        now = time.time()
        rec = JobRecord(name=spec.name, seq=self._next_seq(), spec=spec.model_dump(mode="json"),
                        priority=spec.priority, state=JobState.QUEUED, state_since=now, submitted_at=now,
                        source=source, reason="waiting its turn")
        self._event(rec, "accepted", f"queued from {source or 'a request'}")
        self.records[rec.name] = rec
        self.save(rec)
        return rec

    def requeue_front(self, rec: JobRecord, reason: str, *, attempt: int | None = None) -> None:
        """Back to queued ahead of every other job (a graceful stop is not the job's fault)."""
        others = [r.seq for r in self.records.values() if r is not rec]
        rec.seq = min([rec.seq, *(s - 1 for s in others)])
        self.transition(rec, JobState.QUEUED, reason, kind="requeued", attempt=attempt)

    def retry(self, rec: JobRecord) -> None:
        """A failed or cancelled job back to the tail of the queue, restart budget reset."""
        rec.restarts_without_progress = 0
        rec.seq = self._next_seq()
        self.transition(rec, JobState.QUEUED, "retry requested; resumes from its last checkpoint", kind="retry")

    def back_off(self, rec: JobRecord, delay: float, reason: str, *, kind: str, attempt: int | None) -> None:
        self.transition(rec, JobState.BACKING_OFF, reason, kind=kind, attempt=attempt)
        rec.next_attempt_at = time.time() + delay
        self.save(rec)

    def begin_attempt(self, rec: JobRecord, attempt: Attempt) -> None:
        rec.attempts.append(attempt)
        self.save(rec)

    def end_attempt(self, rec: JobRecord, *, outcome: str, exit_code: int | None, error: str = "") -> None:
        att = rec.last_attempt
        if att is not None and att.ended_at is None:
            att.ended_at = time.time()
            att.outcome = outcome
            att.exit_code = exit_code
            att.error = one_line(error)
            self.save(rec)

    def set_attempt_slurm(self, rec: JobRecord, info: dict) -> None:
        """What SLURM last said of the live attempt's batch job (its id, state, node), saved."""
        att = rec.last_attempt
        if att is not None:
            att.slurm = dict(info)
            self.save(rec)

    def note(self, rec: JobRecord, kind: str, message: str, *, attempt: int | None = None) -> None:
        """An event that does not change the state (a warning, a pruned checkpoint)."""
        self._event(rec, kind, message, attempt)
        self.save(rec)

    def set_progress(self, rec: JobRecord, phase: str, p, *, save: bool) -> None:
        prog = rec.progress if rec.progress and rec.progress.get("phase") == phase else {"phase": phase, "losses": []}
        prog.update(step=p.step, total=p.total, loss=p.loss, tok_per_sec=p.tok_per_sec, dt_ms=p.dt_ms,
                    peak_mem_gib=p.peak_mem_gib, at=time.time())
        if p.loss is not None:
            losses = prog.setdefault("losses", [])
            if not losses or losses[-1][0] != p.step:
                losses.append([p.step, p.loss])
                del losses[:-MAX_LOSSES]
        rec.progress = prog
        att = rec.last_attempt
        if att is not None:
            att.first_step = p.step if att.first_step is None else att.first_step
            att.last_step = p.step
        if save:
            self.save(rec)

    def set_checkpoint(self, rec: JobRecord, phase: str, step: int, nbytes: int) -> None:
        rec.checkpoint = {"phase": phase, "step": step, "at": time.time(), "bytes": nbytes}
        self.save(rec)

    def save(self, rec: JobRecord) -> None:
        write_json_atomic(record_path(self.settings, rec.name), rec.to_dict())

    # -- internals
    def _next_seq(self) -> int:
        return max((r.seq for r in self.records.values()), default=0) + 1

    def _event(self, rec: JobRecord, kind: str, message: str, attempt: int | None = None) -> None:
        ev = {"at": time.time(), "attempt": attempt, "kind": kind, "message": one_line(message)}
        rec.events.append(ev)
        log.info("%s: %s: %s", rec.name, kind, one_line(message))  # the journal's copy
        del rec.events[:-MAX_EVENTS]
        for observe in self.observers:
            try:
                observe(rec, ev)
            except Exception:  # an observer's trouble must never cost a state change
                log.exception("%s: event observer failed", rec.name)


# ---- requests from the CLI to a running daemon ------------------------------------
def write_request(settings, action: str, job: str) -> Path:
    """Drop a request (cancel, retry) for the daemon's next tick; returns its path."""
    check_name(job, "job name")
    settings.requests_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = settings.requests_dir / f"{time.time_ns()}-{os.getpid()}-{action}.json"
    write_json_atomic(path, {"action": action, "job": job, "at": time.time()})
    return path


def take_requests(settings) -> list[dict]:
    """The pending requests, oldest first; each is removed as it is taken."""
    try:
        names = sorted(n for n in os.listdir(settings.requests_dir) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        path = settings.requests_dir / n
        req = read_json(path)
        try:
            os.unlink(path)
        except OSError:
            pass
        if isinstance(req, dict) and isinstance(req.get("action"), str) and isinstance(req.get("job"), str):
            out.append(req)
    return out
