"""Claims about the notifier (daemon/notify/notifier.py, outbox.py): durable before the state, retried, limited.

A real Queue in a temporary home, real json:// endpoints on 127.0.0.1, a real closed port
and apprise's real sender subprocess (helpers from tests/test_notify.py).
"""
from __future__ import annotations

import json
import os
import stat
import time

import pytest

from daemon import queue as q
from daemon.notify.notifier import RATE_MAX, retry_delay
from daemon.notify.outbox import DELIVERED, PENDING
from daemon.queue import JobState, Queue
from tests.conftest import wait_until
from tests.test_notify import (Endpoint, _Step, closed_port, endpoint, global_events, job,  # noqa: F401 (fixtures)
                               make_queue, notifiers, run_to_end, started)

S = JobState


# ---- the notifier: outbox, retries, rate limit ---------------------------------------------------
def test_a_jobs_end_is_in_the_outbox_before_its_record_is_saved(nanod_home, notifiers):
    s, queue = make_queue(nanod_home, notify_urls=[f"json://127.0.0.1:{closed_port()}/"])
    started(notifiers, s, queue)
    seen = []
    queue.observers.append(lambda rec, ev: seen.append(
        (ev["kind"], [n for n in os.listdir(s.state_dir / "notify") if n.endswith("-done.json")],
         q.load_job(s, rec.name).state)))
    run_to_end(queue, queue.add(job("j")))
    kind, files, on_disk = seen[-1]
    assert kind == "done" and len(files) == 1 and on_disk == S.RUNNING, \
        "a kill -9 between the two writes leaves the message to send, not a done job without one"
    assert stat.S_IMODE(os.stat(s.state_dir / "notify").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(s.state_dir / "notify" / files[0]).st_mode) == 0o600


def test_a_dead_endpoint_is_retried_with_back_off_and_its_failure_is_an_event(nanod_home, notifiers):
    port = closed_port()
    s, queue = make_queue(nanod_home, notify_urls=[f"json://127.0.0.1:{port}/"], notify_timeout=2)
    n = started(notifiers, s, queue)
    run_to_end(queue, queue.add(job("j")))
    [entry] = n.outbox.entries.values()
    wait_until(lambda: entry.targets[0].tries == 1, 30, message="the first try")
    t = entry.targets[0]
    assert t.state == PENDING and t.next_at - time.time() == pytest.approx(retry_delay(1), abs=1.5)
    [failed] = global_events(s, "notify_failed")
    assert failed["job"] == "j" and "retrying with back-off" in failed["message"]
    up = Endpoint(port=port)   # the endpoint comes back: the retry gets through
    try:
        wait_until(lambda: up.got, retry_delay(1) + 20, message="the retry")
        on_disk = s.state_dir / "notify" / f"{entry.id}.json"
        wait_until(lambda: json.loads(on_disk.read_text())["targets"][0]["state"] == DELIVERED, 10,
                   message="the delivered mark on disk")
        assert "after 2 tries" in global_events(s, "notify_sent")[0]["message"]
    finally:
        up.close()
    assert [retry_delay(k) for k in (1, 2, 3)] == [5.0, 10.0, 20.0] and retry_delay(30) == 900.0


def test_what_was_not_delivered_is_sent_by_the_next_notifier_at_its_start(nanod_home, notifiers):
    port = closed_port()
    s, queue = make_queue(nanod_home, notify_urls=[f"json://127.0.0.1:{port}/"], notify_timeout=2)
    first = started(notifiers, s, queue)
    run_to_end(queue, queue.add(job("j")))
    wait_until(lambda: global_events(s, "notify_failed"), 30)
    first.stop(flush=0)
    up = Endpoint(port=port)
    try:
        t0 = time.monotonic()
        started(notifiers, s, Queue(s))
        wait_until(lambda: up.got, 20, message="the pending done at the next start")
        assert time.monotonic() - t0 < retry_delay(1) + 10 and up.titles() == ["j: done · base step 4/4"]
    finally:
        up.close()


def test_a_crash_loop_is_rate_limited_but_the_jobs_end_always_goes_out(nanod_home, endpoint, notifiers):
    s, queue = make_queue(nanod_home, notify_urls=[endpoint.url])
    started(notifiers, s, queue)
    rec = queue.add(job("loop"))
    for n in range(1, 31):
        queue.transition(rec, S.RUNNING, f"attempt {n}", kind="started", attempt=n)
        queue.back_off(rec, 0, f"base stalled; relaunching (restart {n})", kind="stalled", attempt=n)
    queue.transition(rec, S.FAILED, "base stalled 31 times in a row without a new checkpoint; giving up",
                     kind="gave_up", attempt=31)
    wait_until(lambda: any("GAVE UP" in t for t in endpoint.titles()), 60, message="the gave_up notification")
    titles = endpoint.titles()
    assert sum("stalled" in t for t in titles) == RATE_MAX and len(titles) == RATE_MAX + 1
    assert "25 earlier notifications for this job held back" in endpoint.got[-1][1]["message"]
    assert len(global_events(s, "notify_held")) == 1


def test_job_urls_follow_the_jobs_on_and_operator_targets_follow_notify_on(nanod_home, tmp_path, notifiers):
    mine, ops = Endpoint(), Endpoint()
    out = tmp_path / "events.txt"
    try:
        s, queue = make_queue(nanod_home, notify_urls=[ops.url], notify_on=["done"],
                              notify_command=["/bin/sh", "-c", f'echo "$NANOD_EVENT $NANOD_JOB $NANOD_STEP" >> {out}'])
        started(notifiers, s, queue)
        rec = queue.add(job("j", {"urls": [mine.url], "on": ["stalled"]}))
        queue.transition(rec, S.RUNNING, "attempt 1", kind="started", attempt=1)
        queue.back_off(rec, 0, "base stalled", kind="stalled", attempt=1)
        queue.transition(rec, S.RUNNING, "attempt 2", kind="started", attempt=2)
        queue.set_progress(rec, "base", _Step(4, 4), save=False)
        queue.transition(rec, S.DONE, "all phases completed", kind="done", attempt=2)
        wait_until(lambda: mine.got and ops.got and out.exists(), 60)
        assert mine.titles() == ["j: stalled, restarting · base"]
        assert ops.titles() == ["j: done · base step 4/4"]
        assert out.read_text() == "done j 4\n"
        [entry] = [e for e in notifiers[-1].outbox.entries.values() if e.event == "done"]
        assert entry.env["NANOD_MESSAGE"] == entry.title and entry.env["NANOD_DETAILS"] == entry.body
    finally:
        mine.close()
        ops.close()


def test_a_low_disk_health_warning_goes_to_the_operators_targets(nanod_home, endpoint, notifiers):
    s, queue = make_queue(nanod_home, notify_urls=[endpoint.url])
    n = started(notifiers, s, queue)
    n.health_warning("GPU 0 VRAM 95% used (7.6GB of 8GB), above 90%")   # not in notify_on's words
    n.health_warning("disk 1.2GB free on /data (checkpoints), below 5GB")
    wait_until(lambda: endpoint.got, 30)
    time.sleep(0.5)
    assert endpoint.titles() == ["nanod: disk low: disk 1.2GB free on /data (checkpoints), below 5GB"]


def test_the_outbox_is_bounded_even_when_no_target_answers(nanod_home, notifiers, monkeypatch):
    from daemon.notify import outbox
    monkeypatch.setattr(outbox, "MAX_ENTRIES", 12)
    s, queue = make_queue(nanod_home, notify_urls=[f"json://127.0.0.1:{closed_port()}/"], notify_timeout=1)
    n = started(notifiers, s, queue)
    for i in range(20):
        run_to_end(queue, queue.add(job(f"j{i}")))
    files = [f for f in os.listdir(s.state_dir / "notify") if f.endswith(".json")]
    assert len(files) == len(n.outbox.entries) == 12
    assert sorted(files)[0].endswith("-j8-done.json"), "the oldest go first"
    assert len([e for e in global_events(s, "notify_failed") if "the outbox is full" in e["message"]]) == 8


def test_an_unusable_outbox_costs_notifications_never_a_jobs_state(nanod_home, notifiers, caplog):
    s, queue = make_queue(nanod_home, notify_urls=[f"json://127.0.0.1:{closed_port()}/"])
    (s.state_dir / "notify").write_text("not a directory")
    started(notifiers, s, queue)
    rec = queue.add(job("j"))
    run_to_end(queue, rec)
    assert q.load_job(s, "j").state == S.DONE
    assert "cannot use the notification outbox" in global_events(s, "notify_failed")[0]["message"]
    assert "cannot queue a notification for j" in caplog.text
