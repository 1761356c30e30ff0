"""Claims about notifications (daemon/notify/): which events, what text, the outbox, delivery, retries, limits.

Real things only: a real HTTP server on 127.0.0.1 as apprise's json:// target, a real command,
a real closed port, a real Queue in a temporary home and apprise's real sender subprocess.
The notifier's outbox, retries and rate limit are in tests/test_notify_outbox.py, the
end-to-end claims with a real daemon (kill -9, a loop that is never blocked) in
tests/test_notify_e2e.py.
"""
from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time

import pytest

from daemon import queue as q
from daemon.config import ensure_dirs, load_settings
from daemon.notify import deliver
from daemon.notify.events import EVENTS, event_for, mask_url
from daemon.notify.notifier import Notifier
from daemon.queue import JobState, Queue
from daemon.spec import JobFileError, load_job_file, parse_job, parse_job_bytes
from tests.conftest import PYTHON, ROOT, wait_until

S = JobState


# ---- helpers: a real endpoint, a closed port ---------------------------------------------------
class Endpoint:
    """apprise's json:// target: an HTTP server on 127.0.0.1 that keeps what it was sent (and when)."""

    def __init__(self, delay: float = 0.0, port: int = 0):
        self.got: list[tuple[float, dict]] = []
        box = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(box.delay)
                box.got.append((time.time(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.delay = delay
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"json://127.0.0.1:{self.port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def titles(self) -> list[str]:
        return [m["title"] for _, m in self.got]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    e = Endpoint()
    yield e
    e.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # nothing listens there once the socket is closed


def make_queue(home, **settings):
    s = load_settings(home, **settings)
    ensure_dirs(s)
    return s, Queue(s)


def job(name: str, notify: dict | None = None):
    data = {"phases": [{"phase": "base", "args": {"num_iterations": 4}}]}
    if notify is not None:
        data["notify"] = notify
    return parse_job(data, default_name=name)


def run_to_end(queue: Queue, rec, state=S.DONE, kind="done") -> None:
    queue.transition(rec, S.RUNNING, "phase base, attempt 1", kind="started", attempt=1)
    queue.set_progress(rec, "base", _Step(4, 4), save=False)
    queue.transition(rec, state, "all phases completed (last: base)", kind=kind, attempt=1)


class _Step:
    def __init__(self, step, total):
        self.step, self.total = step, total
        self.loss = self.tok_per_sec = self.dt_ms = self.peak_mem_gib = None


def global_events(settings, kind: str) -> list[dict]:
    try:
        lines = (settings.state_dir / "events.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


@pytest.fixture
def notifiers():
    made: list[Notifier] = []
    yield made
    for n in made:
        n.stop(flush=0)


def started(made, settings, queue) -> Notifier:
    n = Notifier(settings)
    n.attach(queue)
    n.start()
    made.append(n)
    return n


# ---- which events ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,new,old,event", [
    ("done", "done", "running", "done"),
    ("gave_up", "failed", "backing_off", "gave_up"),
    ("gave_up", "failed", "running", "gave_up"),
    ("bad_args", "failed", "running", "failed"),
    ("preflight_failed", "failed", "queued", "failed"),
    ("some_later_rooms_kind", "failed", "running", "failed"),   # any way into failed is a failure
    ("cancelled", "cancelled", "running", "cancelled"),
    ("stalled", "backing_off", "running", "stalled"),
    ("oom_backoff", "backing_off", "running", "oom_backoff"),
    ("disk_low", "waiting", "queued", "disk_low"),
    ("paused", "paused", "running", "disk_low"),
    ("relaunch", "backing_off", "running", "daemon_restart"),
    ("phase_done", "backing_off", "running", "phase_done"),
    ("restart", "backing_off", "running", None),     # a crash relaunch is not news; giving up is
    ("waiting", "waiting", "queued", None),          # the GPU lock
    ("pruned", "running", "running", None),
    ("error", "failed", "failed", None),              # a note on a failed job is not a second failure
])
def test_job_events_become_notifications_by_state_change_or_kind(kind, new, old, event):
    assert event_for(kind, new, old) == event
    assert event is None or event in EVENTS


# ---- the job file's notify: block and the operator's settings --------------------------------------
def test_a_job_files_notify_block_is_strict_and_reads_yamls_bare_on_key():
    spec = parse_job_bytes(b"notify:\n  urls: [ntfy://my-topic]\n  on: [done, gave_up]\nphase: base\n",
                           filename="j.yaml")
    assert spec.notify.urls == ["ntfy://my-topic"] and spec.notify.on == ["done", "gave_up"]
    assert parse_job_bytes(b"phase: base\n", filename="j.yaml").notify.on is None   # the operator's notify_on
    for text, words in [
        (b"notify: {urls: [ntfy://t], command: [rm, -rf, /]}\n", "comes from the operator's config"),
        (b"notify: {urls: ['not a url']}\n", "is not an apprise URL"),
        (b"notify: {urls: [ntfy://t], on: [done, donee]}\n", "unknown event 'donee'"),
        (b"notify: {on: [done, done]}\n", "'done' is listed twice"),
        (b"notify: {urls: [ntfy://t, ntfy://t]}\n", "listed twice"),
        (b"notify: {url: [ntfy://t]}\n", "notify.url: unknown key"),
    ]:
        with pytest.raises(JobFileError) as e:
            parse_job_bytes(text + b"phase: base\n", filename="j.yaml")
        assert words in str(e.value) and str(e.value).startswith("j.yaml: notify")


def test_submit_and_check_ask_apprise_about_a_jobs_urls(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text("notify: {urls: [ntfy://my-topic, 'tgram://not-a-bot-token']}\nphase: base\n")
    with pytest.raises(JobFileError) as e:
        load_job_file(path)
    assert "notify.urls: URL 2: apprise cannot use tgram://" in str(e.value)
    assert "not-a-bot-token" not in str(e.value), "a URL's secret part is never echoed"
    path.write_text("notify: {urls: [ntfy://my-topic]}\nphase: base\n")
    assert load_job_file(path).notify.urls == ["ntfy://my-topic"]


def test_notify_command_is_an_argv_list_never_a_string_for_a_shell(nanod_home, monkeypatch):
    monkeypatch.setenv("NANOD_NOTIFY_COMMAND", "notify-send nanod")
    with pytest.raises(ValueError, match="never goes through a shell"):
        load_settings(nanod_home)
    monkeypatch.setenv("NANOD_NOTIFY_COMMAND", '["/usr/bin/notify-send", "nanod; rm -rf ~"]')
    monkeypatch.setenv("NANOD_NOTIFY_URLS", "ntfy://a, json://127.0.0.1:9/")
    s = load_settings(nanod_home)
    assert s.notify_command == ["/usr/bin/notify-send", "nanod; rm -rf ~"]
    assert s.notify_urls == ["ntfy://a", "json://127.0.0.1:9/"]
    assert s.notify_on == ["done", "failed", "gave_up", "stalled", "oom_backoff", "disk_low"]
    monkeypatch.setenv("NANOD_NOTIFY_ON", "done,stalledd")
    with pytest.raises(ValueError, match="unknown event 'stalledd'"):
        load_settings(nanod_home)


def test_urls_shown_in_events_keep_hosts_but_never_tokens_or_topics():
    assert mask_url("json://127.0.0.1:8080/hook") == "json://127.0.0.1:8080/..."
    assert mask_url("ntfy://my-secret-topic") == "ntfy://my-..."
    assert "SECRET" not in mask_url("tgram://123456:SECRET/789") and "pw" not in mask_url("mailto://me:pw@x.org")


# ---- the text -------------------------------------------------------------------------------------
def test_a_message_is_one_short_line_with_job_phase_step_and_what_then_reason_and_status(nanod_home, endpoint,
                                                                                          notifiers):
    s, queue = make_queue(nanod_home, notify_urls=[endpoint.url])
    started(notifiers, s, queue)
    rec = queue.add(job("d8-4060"))
    run_to_end(queue, rec)
    wait_until(lambda: endpoint.got, 30, message="the done notification")
    m = endpoint.got[0][1]
    assert m["title"] == "d8-4060: done · base step 4/4" and "\n" not in m["title"]
    reason, status_line, origin = m["message"].splitlines()
    assert reason == "all phases completed (last: base)"
    assert status_line == "d8-4060  DONE · base (phase 1/1) · step 4/4"
    assert origin.startswith(f"nanod on {socket.gethostname()}") and m["type"] == "success"


def test_each_event_says_what_happened_in_its_title(nanod_home):
    from daemon.notify.message import job_message
    s, queue = make_queue(nanod_home)
    rec = queue.add(job("j"))
    queue.begin_attempt(rec, q.Attempt(n=1, phase="base", device_batch_size=8))
    queue.transition(rec, S.RUNNING, "attempt 1", kind="started", attempt=1)
    queue.set_progress(rec, "base", _Step(120, 400), save=False)
    rec.device_batch_size["base"] = 4

    def title(event, kind="x"):
        return job_message(rec, {"kind": kind, "message": "why", "attempt": 1}, event).title

    assert title("oom_backoff") == "j: out of memory, batch 8 -> 4 · base step 120/400"
    assert title("stalled") == "j: stalled, restarting · base step 120/400"
    assert title("daemon_restart") == "j: resumed after a daemon restart · base step 120/400"
    assert title("gave_up") == "j: GAVE UP · base step 120/400" and title("failed").startswith("j: FAILED")
    queue.transition(rec, S.PAUSED, "paused: waiting for disk space before saving step 120", kind="paused")
    assert title("disk_low") == "j: paused for disk space · base step 120/400"


def test_urls_apprise_refuses_are_events_once_the_daemon_has_them(nanod_home, notifiers):
    s, queue = make_queue(nanod_home, notify_urls=["tgram://operator-typo"])
    started(notifiers, s, queue)
    queue.add(job("j", {"urls": ["ntfy://fine", "tgram://job-typo"]}))   # dropped straight into the inbox
    wait_until(lambda: len(global_events(s, "notify_failed")) == 2, 60, message="both refusals")
    said = {e.get("job"): e["message"] for e in global_events(s, "notify_failed")}
    assert said[None].startswith("notify_urls URL 1: apprise cannot use tgram://ope...")
    assert said["j"].startswith("job j's notify.urls URL 2: apprise cannot use tgram://job...")


# ---- delivery ---------------------------------------------------------------------------------------
def test_each_url_gets_its_own_result_live_dead_and_refused(endpoint):
    dead = f"json://127.0.0.1:{closed_port()}/"
    rs = deliver.send_urls([endpoint.url, dead, "tgram://nonsense"], title="t", body="b", timeout=3)
    assert [r.ok for r in rs] == [True, False, False]
    assert rs[2].permanent and not rs[1].permanent, "a refused URL is not retried; a dead endpoint is"
    assert endpoint.titles() == ["t"]


def test_a_slow_endpoint_is_cut_off_at_the_timeout():
    slow = Endpoint(delay=30)
    try:
        t0 = time.monotonic()
        [r] = deliver.send_urls([slow.url], title="t", body="b", timeout=1.0)
        assert not r.ok and r.error and time.monotonic() - t0 < 1.0 + 5.0, "the timeout, plus starting the sender"
    finally:
        slow.close()


def test_the_command_runs_without_a_shell_with_the_event_in_its_environment(tmp_path, monkeypatch):
    out = tmp_path / "env.json"
    script = tmp_path / "record.py"
    script.write_text("import json, os, sys\njson.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, "
                      f"open({str(out)!r}, 'w'))\n")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/user/0/systemd/notify")   # the daemon's own, under systemd
    r = deliver.run_command([PYTHON, str(script), "$(touch pwned)", "a;b"], {"NANOD_EVENT": "done"}, timeout=10,
                            cwd=tmp_path)
    assert r.ok, r.error
    got = json.loads(out.read_text())
    assert got["argv"] == ["$(touch pwned)", "a;b"] and not (tmp_path / "pwned").exists()
    assert got["env"]["NANOD_EVENT"] == "done" and "NOTIFY_SOCKET" not in got["env"]


def test_a_command_that_hangs_is_killed_at_the_timeout_with_its_children(tmp_path):
    t0 = time.monotonic()
    r = deliver.run_command(["/bin/sh", "-c", "sleep 61.737 & sleep 61.737"], {}, timeout=0.5)
    assert not r.ok and "timed out" in r.error and time.monotonic() - t0 < 5
    left = subprocess.run(["pgrep", "-f", "^sleep 61.737$"], capture_output=True, text=True).stdout.split()
    assert not left, "the command's whole process group is killed"


def test_sending_never_loads_apprise_into_the_calling_process(endpoint):
    code = ("import sys; from daemon.notify import deliver; "
            f"rs = deliver.send_urls([{endpoint.url!r}], title='t', body='b', timeout=5); "
            "print(rs[0].ok, 'apprise' in sys.modules)")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert out.split() == ["True", "False"]


# ---- nanod notify --test ---------------------------------------------------------------------------
def test_notify_test_sends_to_every_target_and_reports_each(nanod_home, endpoint, tmp_path):
    out = tmp_path / "cmd.txt"
    nanod_home.mkdir(parents=True)
    dead = f"json://127.0.0.1:{closed_port()}/"
    (nanod_home / "config.toml").write_text(
        f'notify_urls = ["{endpoint.url}", "{dead}"]\nnotify_timeout = "3s"\n'
        f'notify_command = ["/bin/sh", "-c", "echo $NANOD_EVENT > {out}"]\n')
    r = subprocess.run([PYTHON, "-m", "daemon.cli", "--home", str(nanod_home), "notify", "--test"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    lines = r.stdout.splitlines()
    assert r.returncode == 1, r.stderr
    assert lines[0].startswith(f"OK    json://127.0.0.1:{endpoint.port}") and lines[1].startswith("FAIL  json://")
    assert lines[2].startswith("OK    /bin/sh") and lines[3] == "2 of 3 targets took the test message"
    assert out.read_text() == "test\n" and endpoint.titles()[0].startswith("nanod: test notification")


def test_notify_with_nothing_configured_says_where_to_configure_it(nanod_home):
    r = subprocess.run([PYTHON, "-m", "daemon.cli", "--home", str(nanod_home), "notify", "--test"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "no notification targets: set notify_urls" in r.stderr
    assert "Traceback" not in r.stderr
