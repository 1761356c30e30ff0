"""End-to-end claims about notifications with a real `nanod run`: kill -9 after a job's end, a loop never blocked.

The targets are real: json:// endpoints on 127.0.0.1 (one answering, one that sleeps past
the timeout, a closed port) and a real command. Jobs that fail at the preflight (an unknown
flag) end in a tick, without a trainer; the kill -9 claim runs the real trainer to done.
"""
from __future__ import annotations

import json
import os
import time

import psutil
import pytest

from tests.conftest import PYTHON, wait_until
from tests.test_daemon_e2e import env, plan  # noqa: F401 (env is a fixture)
from tests.test_notify import Endpoint, closed_port

pytestmark = pytest.mark.slow


def configure(home, **values) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))


def outbox(home) -> list[dict]:
    d = home / "state" / "notify"
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        try:
            out.append(json.loads((d / n).read_text()))
        except (OSError, ValueError):
            continue
    return out


def events(home, kind: str) -> list[dict]:
    try:
        lines = (home / "state" / "events.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [e for e in map(json.loads, lines) if e.get("kind") == kind]


def failing_job(name: str) -> dict:
    """Fails at the preflight before any trainer starts: the builtin trainer has no such flag."""
    return {"name": name, "phases": [{"phase": "base", "args": {"num_iterations": 2, "no_such_flag": 1}}]}


def test_kill_9_right_after_a_jobs_end_still_delivers_done_at_the_next_start(env):
    port = closed_port()   # nothing answers while the first daemon lives
    configure(env.home, notify_urls=[f"json://127.0.0.1:{port}/"], notify_timeout="2s")
    first = env.daemon()
    env.drop(plan("fin", steps=2, save_every=2))
    env.wait_state("fin", "done", timeout=150)
    first.kill9()
    [entry] = [e for e in outbox(env.home) if e["event"] == "done"]
    assert entry["targets"][0]["state"] == "pending"
    up = Endpoint(port=port)
    try:
        env.daemon()
        wait_until(lambda: up.got, 30, message="the done notification from the second daemon")
        assert up.titles() == ["fin: done · base step 2/2"]
        wait_until(lambda: [e["targets"][0]["state"] for e in outbox(env.home) if e["event"] == "done"] ==
                   ["delivered"], 10, message="the delivered mark")
        time.sleep(1.0)
        assert len(up.got) == 1, "a delivered notification is not sent again"
    finally:
        up.close()


def test_slow_and_dead_endpoints_never_block_the_loop_and_the_command_still_runs(env, tmp_path):
    slow = Endpoint(delay=60)
    dead = f"json://127.0.0.1:{closed_port()}/"
    out = tmp_path / "command-env.json"
    script = tmp_path / "record.py"
    script.write_text("import json, os, sys\nenv = {k: v for k, v in os.environ.items() if k.startswith('NANOD_')}\n"
                      "json.dump(env, open(sys.argv[1], 'w'))\n")
    timeout = 8.0
    configure(env.home, notify_urls=[slow.url, dead], notify_command=[PYTHON, str(script), str(out)],
              notify_timeout=f"{timeout}s")
    try:
        d = env.daemon()
        env.drop(failing_job("first"))
        env.wait_state("first", "failed", timeout=30)
        # its notification is now being sent to a target that will not answer for 60 s
        t0 = time.monotonic()
        env.drop(failing_job("second"))
        env.wait_state("second", "failed", timeout=30)
        took = time.monotonic() - t0
        assert took < timeout / 2, f"the loop went on while a send hung ({took:.1f}s for the second job)"
        beats = []
        while time.monotonic() - t0 < timeout:
            beats.append(json.loads((env.home / "state" / "daemon.json").read_text())["heartbeat_at"])
            time.sleep(0.2)
        assert max(b - a for a, b in zip(beats, beats[1:])) < 2.0, "the heartbeat kept ticking"
        wait_until(lambda: len([e for e in events(env.home, "notify_failed") if e.get("job") == "first"]) >= 2,
                   timeout + 40, message="the two failures of the first job's notification")
        failed = " | ".join(e["message"] for e in events(env.home, "notify_failed") if e.get("job") == "first")
        assert f"127.0.0.1:{slow.port}" in failed and "retrying with back-off" in failed
        got = json.loads(out.read_text())
        assert got["NANOD_EVENT"] == "failed" and got["NANOD_JOB"] in ("first", "second")
        assert got["NANOD_PHASE"] == "base" and got["NANOD_MESSAGE"].startswith(got["NANOD_JOB"] + ": FAILED")
        rss_mb = psutil.Process(d.proc.pid).memory_info().rss / 2**20
        assert rss_mb < 60, f"the daemon's RSS after sending is {rss_mb:.0f} MB: apprise must stay out of it"
        assert d.proc.poll() is None
    finally:
        slow.close()
