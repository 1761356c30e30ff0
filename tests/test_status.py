"""`nanod status` from prepared state directories (tests/fixtures/status/<case>/).

Each case is a nanod home written per the durable-state schema plus a
`world.json` saying what the probe answers (time, live pids, held locks, disk,
health). Text and JSON are compared with golden files in tests/golden/;
regenerate them after an intended change with

    NANOD_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_status.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.commands.status import render_text, sparkline
from daemon.config import load_settings
from daemon.statusview import JOB_STATES, SCHEMA, Probe, build_view, lock_is_held

from conftest import ROOT, wait_until

FIXTURES = ROOT / "tests" / "fixtures" / "status"
GOLDEN = ROOT / "tests" / "golden"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "world.json").exists())
REGEN = bool(os.environ.get("NANOD_REGEN_GOLDEN"))
NANOD = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]


class FixtureProbe(Probe):
    """The world a prepared case describes, instead of the real machine."""

    def __init__(self, case_dir: Path, world: dict):
        self.case_dir, self.world = case_dir, world

    def now(self):
        return self.world["now"]

    def pid_alive(self, pid, proc_start=None):
        return pid in self.world["alive_pids"]

    def lock_held(self, path):
        rel = os.path.relpath(path, self.case_dir)
        return rel in self.world["held_locks"]

    def disk_usage(self, path):
        return dict(self.world["disk"])

    def process_command(self, pid):
        return ""

    def health(self, settings):
        return self.world["health"]


def prepared(case: str, tmp_path: Path):
    """A copy of the case (status must not write, but a test never risks the fixture) and its view."""
    d = tmp_path / case
    shutil.copytree(FIXTURES / case, d)
    settings = load_settings(d / "home", lock_dir=d / "locks", nanochat_base_dir=d / "nanochat")
    world = json.loads((d / "world.json").read_text())
    # a checkout stamps files with the time of the clone: give them the case's own time
    stamp = world["now"] - 300
    for f in d.rglob("*"):
        os.utime(f, (stamp, stamp), follow_symlinks=False)
    view = build_view(settings, probe=FixtureProbe(d, world))
    # the same paths whatever the temporary directory, so goldens do not depend on it
    return d, json.loads(json.dumps(view).replace(str(d), "/case"))


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if not REGEN:
            pytest.skip(f"wrote missing golden file {path.name}; check it and commit it")
    assert text == path.read_text(), f"{name} differs; regenerate with NANOD_REGEN_GOLDEN=1 if intended"


# ---- golden screens and JSON -------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_status_text_matches_golden(case, tmp_path):
    _, view = prepared(case, tmp_path)
    check_golden(f"status_{case}.txt", render_text(view, width=80))


@pytest.mark.parametrize("case", CASES)
def test_status_json_matches_golden(case, tmp_path):
    _, view = prepared(case, tmp_path)
    for job in view["jobs"]:  # 200 loss points would bury the rest of the golden file
        if job["progress"]:
            job["progress"]["losses"] = job["progress"]["losses"][:2] + [["..."]]
    check_golden(f"status_{case}.json", json.dumps(view, indent=1, ensure_ascii=False) + "\n")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("width", [80, 60])
def test_status_text_fits_the_terminal_width(case, width, tmp_path):
    _, view = prepared(case, tmp_path)
    for line in render_text(view, width=width).splitlines():
        assert len(line) <= width, line


@pytest.mark.parametrize("case", CASES)
def test_status_json_has_the_versioned_schema(case, tmp_path):
    _, view = prepared(case, tmp_path)
    assert view["schema"] == SCHEMA == 1
    assert set(view) >= {"schema", "generated_at", "home", "daemon", "current", "jobs", "gpus", "disk",
                         "health", "rejected", "events"}
    assert set(view["daemon"]) >= {"up", "summary", "pid", "started_at", "heartbeat_at", "inbox", "inbox_mode"}
    for job in view["jobs"]:
        assert set(job) >= {"name", "state", "reason", "phase", "progress", "checkpoint", "attempts", "restarts",
                            "oom_backoffs", "device_batch_size"}
        assert job["state"] in JOB_STATES
    json.dumps(view, allow_nan=False)  # plain JSON a script can read


def test_running_case_shows_progress_eta_loss_and_checkpoint(tmp_path):
    _, view = prepared("running", tmp_path)
    text = render_text(view)
    job = view["jobs"][0]
    assert view["daemon"]["up"] and view["current"] == "d8-4060"
    assert job["progress"]["percent"] == pytest.approx(35.51, abs=0.01)
    assert job["progress"]["eta_s"] == pytest.approx((3520 - 1250) * 0.812, abs=0.1)
    assert (job["attempts"], job["restarts"], job["oom_backoffs"], job["device_batch_size"]) == (3, 2, 1, 1)
    assert "step 1250/3520" in text and "ETA 30m43s" in text and "2,521 tok/s" in text
    assert "checkpoint base step 1250, 3m10s ago" in text
    assert "locked by pid 5151 (d8-4060)" in text and "VRAM 4.6GB/8.6GB" in text
    assert "rejected files in the inbox (1)" in text and "bad.yaml: phases.0.args.device_batch_size" in text
    assert any(c in text for c in "▁▂▃▄▅▆▇█")


def test_waiting_case_names_the_lock_holder_and_polling_reason(tmp_path):
    _, view = prepared("waiting_lock", tmp_path)
    text = render_text(view)
    assert "WAITING" in text and "held by pid 777" in text
    assert "locked by pid 777 (python other_train.py)" in text
    assert "(polling)" in text and "no inotify events there" in text


def test_backing_off_case_says_when_the_next_attempt_starts(tmp_path):
    _, view = prepared("backing_off", tmp_path)
    text = render_text(view)
    assert "BACKING OFF" in text and "next attempt in 16s" in text
    assert view["jobs"][0]["progress"]["eta_s"] is None  # no ETA while nothing runs


def test_paused_case_says_why_and_warns_about_disk(tmp_path):
    _, view = prepared("paused_disk", tmp_path)
    text = render_text(view)
    assert "PAUSED" in text and "paused for disk" in text and "warn" in text


def test_failed_job_shows_its_last_error(tmp_path):
    _, view = prepared("failed", tmp_path)
    text = render_text(view)
    assert view["current"] is None
    assert view["jobs"][1]["error"].startswith("RuntimeError: CUDA error: an illegal memory access")
    assert "failed" in text and "illegal memory access" in text


def test_daemon_down_is_said_plainly_with_the_saved_state(tmp_path):
    _, view = prepared("daemon_down", tmp_path)
    text = render_text(view)
    assert not view["daemon"]["up"]
    assert text.splitlines()[0].startswith("nanod  DOWN")
    assert "did not stop cleanly" in text and "last heartbeat 3h00m ago" in text
    assert "its trainer is not running" in text
    assert "step 1250/3520" in text


def test_a_clean_stop_is_told_apart_from_a_death(tmp_path):
    _, view = prepared("daemon_stopped", tmp_path)
    assert view["daemon"]["summary"] == "down: stopped cleanly 10m00s ago"
    assert "resumes at the next start" in render_text(view, width=200)


def test_empty_home_says_how_to_start(tmp_path):
    _, view = prepared("empty", tmp_path)
    text = render_text(view)
    assert "never run in this home" in text and "nanod submit FILE" in text


# ---- pieces --------------------------------------------------------------------------
def test_sparkline_falls_as_the_loss_falls():
    s = sparkline([5, 4, 3, 2, 1], 10)
    assert s[0] == "█" and s[-1] == "▁" and list(s) == sorted(s, reverse=True)
    assert len(sparkline([float(i) for i in range(500)], 32)) == 32
    assert sparkline([], 10) == "" and sparkline([1.0, 1.0], 10) == "▅▅"


def test_lock_probe_sees_a_held_lock_without_taking_it(tmp_path):
    path = tmp_path / "daemon.lock"
    path.write_text("")
    assert not lock_is_held(path)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl,sys,time;f=open(sys.argv[1]);fcntl.flock(f,fcntl.LOCK_EX);"
                               "print('locked',flush=True);time.sleep(60)", str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert lock_is_held(path)
        assert lock_is_held(path)  # looking twice changes nothing
    finally:
        holder.kill()
        holder.wait()
    wait_until(lambda: not lock_is_held(path), 5, message="lock released when its holder died")
    assert not lock_is_held(tmp_path / "missing.lock")


def test_real_command_sees_a_live_daemon_and_works_with_it_down(tmp_path):
    """The real probe: a process holding state/daemon.lock with its pid in daemon.json is 'up'."""
    home = tmp_path / "home"
    (home / "state").mkdir(parents=True)
    lock = home / "state" / "daemon.lock"
    lock.write_text("")
    fake = subprocess.Popen([sys.executable, "-c",
                             "import fcntl,sys,time;f=open(sys.argv[1]);fcntl.flock(f,fcntl.LOCK_EX);"
                             "print('locked',flush=True);time.sleep(60)", str(lock)], stdout=subprocess.PIPE)
    env = {**os.environ, "NANOD_LOCK_DIR": str(tmp_path / "locks")}
    try:
        assert fake.stdout.readline().strip() == b"locked"
        (home / "state" / "daemon.json").write_text(json.dumps(
            {"pid": fake.pid, "started_at": time.time() - 5, "heartbeat_at": time.time(), "version": "0.1.0",
             "inbox": str(home / "jobs"), "inbox_mode": "inotify"}))
        out = subprocess.run([*NANOD, "--home", str(home), "status", "--json"],
                             capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["daemon"]["up"] is True
    finally:
        fake.kill()
        fake.wait()
    out = subprocess.run([*NANOD, "--home", str(home), "status", "--exit-code"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 1 and "DOWN" in out.stdout and out.stderr == ""
    assert not (home / "requests").exists()  # status wrote nothing


def test_watch_refreshes_until_interrupted(tmp_path):
    home = tmp_path / "home"
    proc = subprocess.Popen([*NANOD, "--home", str(home), "status", "--watch",
                             "--json", "--interval", "0.2"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "NANOD_LOCK_DIR": str(tmp_path / "locks")})
    try:
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert second["generated_at"] > first["generated_at"]
    finally:
        proc.send_signal(2)
        assert proc.wait(10) == 0


def test_trajectory_keeps_the_path_to_the_newest_step():
    from daemon.statusview import trajectory
    resumed = [[1, 5.0], [2, 4.0], [3, 3.5], [4, 3.4], [3, 3.6], [4, 3.3], [5, 3.1]]
    assert trajectory(resumed) == [[1, 5.0], [2, 4.0], [3, 3.6], [4, 3.3], [5, 3.1]]
    reread = [[1, 5.0], [2, 4.0], [1, 5.0], [2, 4.0]]
    assert trajectory(reread) == [[1, 5.0], [2, 4.0]]
    assert trajectory([[1, 2.0], "junk", [True, 1.0], [2, None], [3, float("nan")]]) == [[1, 2.0]]


def test_a_diverged_loss_keeps_the_json_valid(tmp_path):
    d = tmp_path / "running"
    shutil.copytree(FIXTURES / "running", d)
    rec_path = d / "home" / "state" / "jobs" / "d8-4060.json"
    rec = json.loads(rec_path.read_text())
    rec["progress"]["loss"] = float("nan")
    rec["progress"]["losses"][-1][1] = float("inf")
    rec_path.write_text(json.dumps(rec))  # Python writes NaN/Infinity tokens, as queue.py would
    settings = load_settings(d / "home", lock_dir=d / "locks", nanochat_base_dir=d / "nanochat")
    view = build_view(settings, probe=FixtureProbe(d, json.loads((d / "world.json").read_text())))
    json.dumps(view, allow_nan=False)
    assert view["jobs"][0]["progress"]["loss"] is None
    render_text(view)


def test_daemon_down_with_a_live_trainer_reads_progress_from_its_log(tmp_path):
    d = tmp_path / "daemon_down"
    shutil.copytree(FIXTURES / "daemon_down", d)
    log = d / "home" / "logs" / "d8-4060" / "attempt-003.log"
    log.parent.mkdir(parents=True)
    log.write_text("step 01251/03520 (35.54%) | loss: 3.100000 | dt: 812.00ms\n"
                   "step 01252/03520 (35.57%) | loss: 3.090000 | dt: 812.00ms\nhalf a li")
    world = json.loads((d / "world.json").read_text())
    world["alive_pids"] = [5151]
    settings = load_settings(d / "home", lock_dir=d / "locks", nanochat_base_dir=d / "nanochat")
    view = build_view(settings, probe=FixtureProbe(d, world))
    p = view["jobs"][0]["progress"]
    assert (p["step"], p["loss"], p["from_log"]) == (1253, 3.09, True)  # the line of step 1252 comes after it
    assert p["losses"][-1] == [1253, 3.09]
    text = render_text(view)
    assert "its trainer is still running" in text and "step 1253/3520" in text


def test_every_json_key_is_documented(tmp_path):
    doc = (ROOT / "docs" / "status-json.md").read_text()
    _, view = prepared("running", tmp_path)
    job = view["jobs"][0]
    groups = {"top": view, "daemon": view["daemon"], "job": job, "progress": job["progress"],
              "attempt": job["attempt"], "checkpoint": job["checkpoint"], "gpu": view["gpus"][0],
              "vram": view["gpus"][0]["vram"], "health": view["health"], "event": view["events"][0],
              "rejected": view["rejected"][0]}
    missing = [f"{g}.{k}" for g, obj in groups.items() for k in obj if f'"{k}"' not in doc and f"`{k}`" not in doc]
    assert not missing, f"document these in docs/status-json.md: {missing}"


def test_an_auto_batch_is_shown_with_its_choice_and_before_it(tmp_path):
    d = tmp_path / "running"
    shutil.copytree(FIXTURES / "running", d)
    rec_path = d / "home" / "state" / "jobs" / "d8-4060.json"
    rec = json.loads(rec_path.read_text())
    rec["spec"]["phases"][0]["args"]["device_batch_size"] = "auto"
    settings = load_settings(d / "home", lock_dir=d / "locks", nanochat_base_dir=d / "nanochat")
    world = json.loads((d / "world.json").read_text())

    def view_of(rec):
        rec_path.write_text(json.dumps(rec))
        return build_view(settings, probe=FixtureProbe(d, world))

    view = view_of(rec)
    assert (view["jobs"][0]["device_batch_size"], view["jobs"][0]["device_batch_size_auto"]) == (1, True)
    assert "device_batch_size 1 (auto)" in render_text(view, width=200)
    rec["device_batch_size"], rec["attempts"][-1]["device_batch_size"] = {}, None   # still probing
    view = view_of(rec)
    assert view["jobs"][0]["device_batch_size"] is None and view["jobs"][0]["device_batch_size_auto"]
    assert "device_batch_size auto (not chosen yet)" in render_text(view, width=200)
