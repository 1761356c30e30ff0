"""The daemon's notifier: a Queue observer that fills the outbox, and a sender thread that empties it.

In the loop's thread (`observe`, called by queue.py for every job event before the job's
record is saved) it only decides whether the event is a notification (events.event_for),
for which targets (the operator's notify_urls and notify_command for notify_on, the job's
notify.urls for its notify.on), applies the rate limit and writes the outbox entry. All
sending happens in the sender thread, one subprocess at a time (deliver.py), each with a
timeout; a failed target is retried with back-off, and its failures are events in
state/events.jsonl (kind notify_failed; notify_sent when one got through after failing).

Promise 15: a job's end (done, failed, gave up, cancelled) is never rate-limited and is
retried for END_RETRY_FOR; whatever was not delivered when the daemon died is sent at the
next start. Other events: at most RATE_MAX per job per RATE_WINDOW (counted from the
outbox, so a daemon crash loop is limited too), OTHER_TRIES tries each.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from daemon.notify import deliver
from daemon.notify.events import END_EVENTS, event_for, mask_url
from daemon.notify.message import Message, daemon_message, job_message
from daemon.notify.outbox import ABANDONED, DELIVERED, PENDING, RATE_WINDOW, Entry, Outbox, Target, new_id

log = logging.getLogger("nanod")
RATE_MAX = 5                  # notifications per job (and for the daemon's own) per RATE_WINDOW, ends excepted
BACKOFF_FIRST, BACKOFF_MAX = 5.0, 900.0   # s: 5, 10, 20 ... 15 min between tries of one target
END_RETRY_FOR = 3 * 86400.0   # s a job's end is retried before it is abandoned
OTHER_TRIES = 5               # tries of any other notification


def retry_delay(tries: int) -> float:
    """Seconds before the next try after `tries` failed ones (1-based)."""
    return min(BACKOFF_FIRST * 2 ** max(0, tries - 1), BACKOFF_MAX)


class Notifier:
    def __init__(self, settings):
        self.settings = settings
        self.outbox = Outbox(settings.state_dir / "notify")
        self.cond = threading.Condition()
        self._states: dict[str, str] = {}        # job -> the state its last event left it in
        self._held: dict[str | None, int] = defaultdict(int)   # rate-limited since the last that went out
        self._checks: list[tuple[str | None, list[str]]] = []  # URLs for apprise to look at
        self._stop_at: float | None = None       # monotonic: stopping; deliver what is due until then
        self._thread: threading.Thread | None = None

    @property
    def configured(self) -> bool:
        s = self.settings
        return bool(s.notify_urls or s.notify_command)

    # ---- set-up --------------------------------------------------------------------
    def attach(self, queue) -> None:
        """Observe `queue`'s job events from now on; the states it holds now are the starting point."""
        self._states = {r.name: r.state.value for r in queue.records.values()}
        queue.observers.append(self.observe)

    def start(self) -> None:
        """Load the outbox (what a previous daemon did not deliver is due now) and start sending."""
        try:
            self.outbox.load()
        except OSError as e:  # the daemon runs on without notifications rather than not at all
            log.error("notify: cannot use the outbox %s: %s", self.outbox.dir, e)
            self._record("notify_failed", f"cannot use the notification outbox {self.outbox.dir}: {e}", None)
        now = time.time()
        for e in self.outbox.pending():
            for t in e.targets:
                if t.state == PENDING:
                    t.next_at = now
        if self.settings.notify_urls:
            self._checks.append((None, list(self.settings.notify_urls)))
        self._thread = threading.Thread(target=self._run, name="nanod-notify", daemon=True)
        self._thread.start()

    def stop(self, flush: float | None = None) -> None:
        """Deliver what is due now for at most `flush` seconds (default: about one send's timeout), then stop."""
        flush = self.settings.notify_timeout + 2.0 if flush is None else flush
        with self.cond:
            self._stop_at = time.monotonic() + flush
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(flush + 1.0)

    # ---- in the loop's thread: events into the outbox -------------------------------------
    def observe(self, rec, ev: dict) -> None:
        """Queue observer: called for every job event, before the record is saved. Never raises."""
        try:
            old, new = self._states.get(rec.name), rec.state.value
            self._states[rec.name] = new
            if ev.get("kind") == "accepted" and rec.job_spec.notify.urls:
                self._check_later(rec.name, list(rec.job_spec.notify.urls))
            event = event_for(str(ev.get("kind")), new, old)
            if event is not None:
                self.enqueue_job(rec, ev, event)
        except Exception:  # a notification must never cost a job event
            log.exception("notify: cannot queue a notification for %s", rec.name)

    def enqueue_job(self, rec, ev: dict, event: str) -> Entry | None:
        spec = rec.job_spec.notify
        job_on = spec.on if spec.on is not None else self.settings.notify_on
        targets = self.targets(event, job_urls=spec.urls if event in job_on else [])
        if not targets or not self._admit(rec.name, event):
            return None
        held = self._held.pop(rec.name, 0)
        return self._add(event, rec.name, job_message(rec, ev, event, held_back=held), targets)

    def health_warning(self, text: str) -> None:
        """A health warning (health.py's thread): a disk one is disk_low for the operator's targets."""
        try:
            if text.startswith("disk ") and self.targets("disk_low") and self._admit(None, "disk_low"):
                self._held.pop(None, None)
                self._add("disk_low", None, daemon_message("disk_low", text), self.targets("disk_low"))
        except Exception:
            log.exception("notify: cannot queue a health notification")

    def targets(self, event: str, job_urls: list[str] = ()) -> list[Target]:
        """The operator's URLs and command when notify_on has `event`, then the job's own URLs (given
        only when the job's `on` has it); a URL named twice is one target."""
        s = self.settings
        urls = list(s.notify_urls) if event in s.notify_on else []
        out = [Target.for_url(u, mask_url(u)) for u in dict.fromkeys([*urls, *job_urls])]
        if s.notify_command and event in s.notify_on:
            out.append(Target(key="command", label=" ".join(s.notify_command)[:80]))
        return out

    def _admit(self, job: str | None, event: str) -> bool:
        """The rate limit: ends always pass; others while the job had fewer than RATE_MAX in the window."""
        if event in END_EVENTS or self.outbox.recent(job, time.time() - RATE_WINDOW) < RATE_MAX:
            return True
        self._held[job] += 1
        if self._held[job] == 1:
            self._record("notify_held", f"rate limit: {RATE_MAX} notifications within the last "
                         f"{RATE_WINDOW / 3600:g}h; holding back the next ones (a job's end still goes out)", job)
        return False

    def _add(self, event: str, job: str | None, msg: Message, targets: list[Target]) -> Entry:
        now = time.time()
        for t in targets:
            t.next_at = now
        entry = Entry(id=new_id(event, job), created_at=now, event=event, job=job, title=msg.title, body=msg.body,
                      notify_type=msg.notify_type, env=msg.env, targets=targets)
        self.outbox.add(entry)
        for dropped in self.outbox.prune(now):
            self._record("notify_failed", f"{dropped.event} notification dropped: the outbox is full", dropped.job)
        with self.cond:
            self.cond.notify_all()
        return entry

    def _check_later(self, job: str | None, urls: list[str]) -> None:
        with self.cond:
            self._checks.append((job, urls))
            self.cond.notify_all()

    # ---- the sender thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self._stop_at is not None and time.monotonic() > self._stop_at:
                        return
                    now = time.time()
                    if self._checks or self.outbox.due(now):
                        break
                    if self._stop_at is not None:
                        return   # stopping, and nothing is due now: retries wait for the next start
                    nxt = self.outbox.next_due()
                    self.cond.wait(None if nxt is None else max(0.05, nxt - now))
                checks, self._checks = self._checks, []
            try:
                for entry, targets in self.outbox.due(time.time()):
                    if self._stop_at is not None and time.monotonic() > self._stop_at:
                        return
                    self.send_entry(entry, targets)
                for job, urls in checks:   # after what is due: a check must not delay a message
                    self._check(job, urls)
            except Exception:  # the thread must outlive any one bad entry
                log.exception("notify: sender error")
                time.sleep(1.0)

    def send_entry(self, entry: Entry, targets: list[Target]) -> None:
        """One try of `targets` of `entry`; marks, retries and events follow from the results."""
        s = self.settings
        urls = [t for t in targets if t.url]
        results = []
        if urls:
            rs = deliver.send_urls([t.url for t in urls], title=entry.title, body=entry.body,
                                   notify_type=entry.notify_type, timeout=s.notify_timeout)
            results += list(zip(urls, rs))
        for t in targets:
            if t.key != "command":
                continue
            if s.notify_command:
                results.append((t, deliver.run_command(list(s.notify_command), entry.env, timeout=s.notify_timeout,
                                                       cwd=s.home)))
            else:
                results.append((t, deliver.Result(t.label, False, "notify_command is no longer configured",
                                                  permanent=True)))
        with self.outbox.lock:
            for t, r in results:
                self._mark(entry, t, r)
            self.outbox.save(entry)

    def _mark(self, entry: Entry, t: Target, r: deliver.Result) -> None:
        now = time.time()
        what = f"{entry.event} notification" + (f" for {entry.job}" if entry.job else "")
        if r.ok:
            t.state, t.done_at = DELIVERED, now
            log.info("notify: %s delivered to %s (%.2fs)", what, t.label, r.seconds)
            if t.tries:
                self._record("notify_sent", f"{what} delivered to {t.label} after {t.tries + 1} tries", entry.job)
            t.tries += 1
            return
        t.tries += 1
        t.error = r.error
        expired = now - entry.created_at > END_RETRY_FOR if entry.end else t.tries >= OTHER_TRIES
        if r.permanent or expired:
            t.state, t.done_at = ABANDONED, now
            self._record("notify_failed", f"{what} to {t.label} abandoned after {t.tries} "
                         f"{'try' if t.tries == 1 else 'tries'}: {r.error}", entry.job)
            return
        delay = retry_delay(t.tries)
        t.next_at = now + delay
        log.warning("notify: %s to %s failed (try %d): %s; next try in %gs", what, t.label, t.tries, r.error, delay)
        if t.tries == 1:
            self._record("notify_failed", f"{what} to {t.label} failed: {r.error}; retrying with back-off", entry.job)

    def _check(self, job: str | None, urls: list[str]) -> None:
        whose = f"job {job}'s notify.urls" if job else "notify_urls"
        for i, r in enumerate(deliver.check_urls_in_child(urls, timeout=self.settings.notify_timeout + 20)):
            if not r.ok:
                self._record("notify_failed", f"{whose} URL {i + 1}: {r.error}", job)

    def _record(self, kind: str, message: str, job: str | None) -> None:
        from daemon.queue import append_event   # thread-safe: it appends one line under its own lock
        try:
            append_event(self.settings, kind, message, job=job)
        except OSError as e:
            log.warning("notify: cannot record %s: %s", kind, e)
