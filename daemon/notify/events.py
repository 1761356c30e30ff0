"""The notification vocabulary: event names, which job events they come from, URL syntax.

Stdlib only: the spec (daemon/spec.py) and the settings (daemon/config.py) validate with it
in every process, the daemon included, where apprise is never imported. What apprise itself
thinks of a URL is deliver.py's (`check_urls`), run where loading it costs nothing that matters.
"""
from __future__ import annotations

import re

# every event a notification can be for; `on:` lists and notify_on take these names
EVENTS = ("done", "failed", "gave_up", "stalled", "oom_backoff", "disk_low", "daemon_restart",
          "phase_done", "cancelled")
DEFAULT_ON = ("done", "failed", "gave_up", "stalled", "oom_backoff", "disk_low")   # DESIGN.md's default
END_EVENTS = frozenset({"done", "failed", "gave_up", "cancelled"})  # at least once, never rate-limited
TEST_EVENT = "test"  # `nanod notify --test`

# job event kinds (queue.py / attempts.py / supervisor.py) that are notifications by themselves;
# the end events come from the job's state changing instead (see event_for)
KIND_EVENTS = {
    "stalled": "stalled",          # a stall relaunch
    "oom_backoff": "oom_backoff",  # out of memory: device_batch_size halved, relaunched
    "disk_low": "disk_low",        # a phase waits for disk space (preflight's disk guard)
    "paused": "disk_low",          # the trainer paused before a save for disk space (its only pause)
    "relaunch": "daemon_restart",  # a job resumed by a new daemon (Attempts.recover)
    "phase_done": "phase_done",
}
STATE_EVENTS = {"done": "done", "cancelled": "cancelled"}   # failed is failed or gave_up

MAX_URLS = 16
MAX_URL_CHARS = 2048
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s\x00-\x1f\x7f]*$")


def event_for(kind: str, new_state: str, old_state: str | None) -> str | None:
    """The notification a job event is, or None. `old_state` is the job's state before the event.

    End events follow the state: whatever path leads a job to failed (a decision, preflight, an
    adapter's refusal, a later room's own kind), the move into it is the notification.
    """
    if new_state != old_state:
        if new_state == "failed":
            return "gave_up" if kind == "gave_up" else "failed"
        if new_state in STATE_EVENTS:
            return STATE_EVENTS[new_state]
    return KIND_EVENTS.get(kind)


def check_url_syntax(url: object, what: str = "notify URL") -> str:
    """`url` when it looks like an apprise URL (scheme://...), else ValueError naming `what`."""
    if not isinstance(url, str):
        raise ValueError(f"{what} must be a string, got {type(url).__name__}")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"{what} is longer than {MAX_URL_CHARS} characters")
    if not _URL_RE.fullmatch(url):
        raise ValueError(f"{what} {mask_url(url)!r} is not an apprise URL (scheme://..., e.g. ntfy://my-topic; "
                         "no spaces)")
    return url


def check_events(names: object) -> list[str]:
    """A list of event names, each known and given once (the caller's error names the field)."""
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"must be a list of events ({', '.join(EVENTS)})")
    seen: list[str] = []
    for n in names:
        if n not in EVENTS:
            raise ValueError(f"unknown event {n!r} (known: {', '.join(EVENTS)})")
        if n in seen:
            raise ValueError(f"{n!r} is listed twice")
        seen.append(n)
    return seen


def mask_url(url: str) -> str:
    """A URL as it may be shown in events and logs: the scheme and a little more, never a token.

    apprise's own privacy form is used where apprise is loaded (deliver.py); this one is for
    places that must not load it.
    """
    url = re.sub(r"[\x00-\x1f\x7f]", "?", str(url))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url[:6] + "..."
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    hostport = authority.rpartition("@")[2]
    host = hostport.split(":", 1)[0]
    # a host name or address (and its port) says which target it is; anything else (an ntfy topic,
    # a bot token, a webhook id) may be the secret itself
    shown = hostport if "." in host and len(hostport) <= 64 else host[:3] + "..." if host else ""
    at = "...@" if "@" in authority else ""
    return f"{scheme}://{at}{shown}" + ("/..." if rest.rstrip("/") != authority else "")
