"""The words of a notification: a title a phone shows whole, a body with the reason and status line.

The title is one line: the job, what happened, its phase and step
("d8-4060: done · sft step 200/200"). The body adds the event's own message (the reason),
the job's line as `nanod status` sees it (built from the status view model,
daemon/statusview.py, so the two never disagree) and where it came from. The same facts go
to the operator's command as NANOD_EVENT, NANOD_JOB, NANOD_PHASE, NANOD_STEP and
NANOD_MESSAGE (the title), with NANOD_DETAILS (the body).

Pure text from a job record: nothing here sends, stores or decides.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

TITLE_MAX = 120
NOTIFY_TYPES = {"done": "success", "failed": "failure", "gave_up": "failure", "stalled": "warning",
                "oom_backoff": "warning", "disk_low": "warning", "daemon_restart": "info",
                "phase_done": "info", "cancelled": "info", "test": "info"}


@dataclass
class Message:
    title: str
    body: str
    notify_type: str = "info"
    env: dict = field(default_factory=dict)


def job_message(rec, ev: dict, event: str, *, held_back: int = 0, now: float | None = None) -> Message:
    """The notification for `event`, which job event `ev` of record `rec` is (rec as it is right now)."""
    from daemon.statusview import job_view
    now = time.time() if now is None else now
    phase = _phase_of(rec, ev.get("attempt"))
    step, total = _step_of(rec, phase)
    where = f"{phase} step {step}/{total}" if step is not None and total else \
        f"{phase} step {step}" if step is not None else phase or ""
    title = _cut(f"{rec.name}: {_what(rec, ev, event, phase)}" + (f" · {where}" if where else ""))
    lines = [str(ev.get("message") or ""), status_line(job_view(rec.to_dict(), now))]
    if held_back:
        lines.append(f"({held_back} earlier notification{'s' if held_back > 1 else ''} for this job held back by "
                     "the rate limit)")
    lines.append(_origin(now))
    body = "\n".join(ln for ln in lines if ln)
    return Message(title, body, NOTIFY_TYPES.get(event, "info"),
                   env={"NANOD_EVENT": event, "NANOD_JOB": rec.name, "NANOD_PHASE": phase or "",
                        "NANOD_STEP": "" if step is None else str(step), "NANOD_MESSAGE": title,
                        "NANOD_DETAILS": body})


def daemon_message(event: str, text: str, *, now: float | None = None) -> Message:
    """A notification about the machine rather than one job (a health warning, `nanod notify --test`)."""
    now = time.time() if now is None else now
    head = {"disk_low": "disk low", "test": "test notification"}.get(event, event.replace("_", " "))
    title = _cut(f"nanod: {head}: {text}" if event != "test" else f"nanod: {head} from {socket.gethostname()}")
    body = f"{text}\n{_origin(now)}"
    return Message(title, body, NOTIFY_TYPES.get(event, "info"),
                   env={"NANOD_EVENT": event, "NANOD_JOB": "", "NANOD_PHASE": "", "NANOD_STEP": "",
                        "NANOD_MESSAGE": title, "NANOD_DETAILS": body})


def status_line(j: dict) -> str:
    """One job as `nanod status` heads it: name, STATE, phase (i/n), attempt, step, checkpoint."""
    ph = j.get("phase") or {}
    bits = [f"{j.get('name')}  {str(j.get('state', '')).replace('_', ' ').upper()}"]
    if ph.get("count"):
        bits.append(f"{ph.get('name') or '?'} (phase {ph.get('index', 0) + 1}/{ph['count']})")
    att = j.get("attempt") or {}
    if att.get("n"):
        bits.append(f"attempt {att['n']}")
    p = j.get("progress")
    if p:
        bits.append(f"step {p['step']}" + (f"/{p['total']}" if p.get("total") else ""))
    c = j.get("checkpoint")
    if c:
        bits.append(f"checkpoint {c.get('phase')} step {c.get('step')}")
    return " · ".join(bits)


def _what(rec, ev: dict, event: str, phase: str | None) -> str:
    if event == "oom_backoff":
        now_dbs = (rec.device_batch_size or {}).get(phase)
        att = _attempt(rec, ev.get("attempt"))
        was = att.device_batch_size if att is not None else None
        return f"out of memory, batch {was} -> {now_dbs}" if was and now_dbs else "out of memory, batch halved"
    if event == "disk_low":
        return "paused for disk space" if rec.state.value == "paused" else "waiting for disk space"
    if event == "phase_done":
        return f"{phase} done, next {rec.phase}" if rec.phase and rec.phase != phase else f"{phase} done"
    return {"done": "done", "failed": "FAILED", "gave_up": "GAVE UP", "cancelled": "cancelled",
            "stalled": "stalled, restarting", "daemon_restart": "resumed after a daemon restart"}.get(event, event)


def _attempt(rec, n: object):
    if isinstance(n, int) and 0 < n <= len(rec.attempts) and rec.attempts[n - 1].n == n:
        return rec.attempts[n - 1]
    return None


def _phase_of(rec, n: object) -> str | None:
    att = _attempt(rec, n)
    return att.phase if att is not None else rec.phase or (rec.last_attempt.phase if rec.last_attempt else None)


def _step_of(rec, phase: str | None) -> tuple[int | None, int | None]:
    p = rec.progress or {}
    if p.get("phase") == phase and isinstance(p.get("step"), int):
        return p["step"], p.get("total")
    c = rec.checkpoint or {}
    if c.get("phase") == phase and isinstance(c.get("step"), int):
        return c["step"], None
    return None, None


def _origin(now: float) -> str:
    return f"nanod on {socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TITLE_MAX else text[: TITLE_MAX - 3] + "..."
