"""The `nanod` command line as a user meets it: --help everywhere, one-line errors, `logs` and `logs -f`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon.cli import build_parser

from conftest import wait_until

# not `-m daemon.cli`: run as __main__, that module's UserError is another class than the commands raise
NANOD = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]
COMMANDS = sorted(build_parser()[1])


def nanod(home: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOD_LOCK_DIR": str(home.parent / "locks")}
    return subprocess.run([*NANOD, "--home", str(home), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def write_job(home: Path, name: str, state: str = "running", attempts: int = 1, reason: str = "") -> None:
    jobs = home / "state" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    rec = {"schema": 1, "name": name, "seq": 1, "priority": 0, "state": state, "state_since": time.time(),
           "reason": reason, "spec": {"name": name, "phases": [{"phase": "base", "args": {}}]}, "phase_index": 0,
           "attempts": [{"n": n, "phase": "base", "pid": None, "started_at": time.time(), "ended_at": None,
                         "outcome": None, "resumed_from": 10 * (n - 1) or None, "device_batch_size": 2,
                         "log": f"logs/{name}/attempt-{n:03d}.log"} for n in range(1, attempts + 1)]}
    tmp = jobs / f".{name}.json.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, jobs / f"{name}.json")  # whole, as queue.py writes it


def write_log(home: Path, name: str, n: int, text: str, mode: str = "w") -> Path:
    path = home / "logs" / name / f"attempt-{n:03d}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        f.write(text)
    return path


def test_the_commands_this_issue_adds_are_registered():
    assert {"status", "logs", "plot", "install-service"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_works(command, tmp_path):
    out = nanod(tmp_path / "home", command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: nanod") and out.stderr == ""


def test_top_level_help_lists_the_commands(tmp_path):
    out = nanod(tmp_path / "home", "--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("status", "logs", "install-service"))


def test_logs_of_an_unknown_job_is_one_line_and_exit_2(tmp_path):
    out = nanod(tmp_path / "home", "logs", "nope")
    assert out.returncode == 2
    assert out.stderr.strip() == f"nanod logs: no job named 'nope' in {tmp_path / 'home'} (nanod list shows the jobs)"
    assert out.stdout == ""


def test_logs_refuses_a_path_as_a_name(tmp_path):
    out = nanod(tmp_path / "home", "logs", "../../etc")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr


def test_logs_prints_the_latest_attempt_or_the_one_asked_for(tmp_path):
    home = tmp_path / "home"
    write_job(home, "tiny", attempts=2)
    write_log(home, "tiny", 1, "first attempt\n")
    write_log(home, "tiny", 2, "second attempt\n")
    assert nanod(home, "logs", "tiny").stdout == "second attempt\n"
    assert nanod(home, "logs", "tiny", "--attempt", "1").stdout == "first attempt\n"
    missing = nanod(home, "logs", "tiny", "--attempt", "7")
    assert missing.returncode == 2 and "no attempt 7 (attempts 1-2)" in missing.stderr


def test_logs_of_a_queued_job_says_it_has_not_started(tmp_path):
    home = tmp_path / "home"
    write_job(home, "later", state="queued", attempts=0)
    out = nanod(home, "logs", "later")
    assert out.returncode == 1 and "has not started an attempt yet (queued)" in out.stderr


def test_logs_follow_prints_growth_and_moves_to_the_next_attempt(tmp_path):
    home = tmp_path / "home"
    write_job(home, "tiny", attempts=1)
    write_log(home, "tiny", 1, "step 00001/00040\n")
    env = {**os.environ, "NANOD_LOCK_DIR": str(tmp_path / "locks")}
    proc = subprocess.Popen([*NANOD, "--home", str(home), "logs", "tiny", "-f"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    got: list[str] = []
    threading.Thread(target=lambda: got.extend(iter(proc.stdout.readline, "")), daemon=True).start()

    def saw(text):
        return lambda: any(text in line for line in list(got))
    try:
        wait_until(saw("step 00001/00040"), 10, message="the existing log")
        write_log(home, "tiny", 1, "step 00002/00040\n", mode="a")
        wait_until(saw("step 00002/00040"), 10, message="a line appended to the log")
        write_log(home, "tiny", 1, "Traceback: boom\n", mode="a")
        wait_until(saw("Traceback: boom"), 10, message="the crash")
        write_job(home, "tiny", attempts=2)  # the daemon relaunched: attempt 2 resumes from step 10
        write_log(home, "tiny", 2, "step 00011/00040\n")
        wait_until(saw("── attempt 2, base, resumed from step 10, device_batch_size 2 ──"), 10, message="separator")
        wait_until(saw("step 00011/00040"), 10, message="the new attempt's log")
        write_log(home, "tiny", 2, "step 00040/00040\n", mode="a")
        write_job(home, "tiny", state="done", attempts=2, reason="all phases completed")
        wait_until(saw("step 00040/00040"), 10, message="the last line")
        assert proc.wait(10) == 0  # the job finished and its last log was read: -f ends
        wait_until(saw("job tiny is done"), 5, message="the closing line")
        lines = "".join(got)
        assert lines.index("Traceback: boom") < lines.index("── attempt 2") < lines.index("step 00011/00040")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_status_rejects_a_bad_interval(tmp_path):
    out = nanod(tmp_path / "home", "status", "--watch", "--interval", "0")
    assert out.returncode == 2 and "--interval" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("var, value, words", [
    ("NANOD_NANOCHAT_REPOS", "[not json", "NANOD_NANOCHAT_REPOS must be JSON"),
    ("NANOD_TICK_INTERVAL", "soon", "bad setting tick_interval: 'soon' is not a duration"),
])
def test_a_bad_setting_in_the_environment_is_one_line_and_exit_2(tmp_path, monkeypatch, var, value, words):
    monkeypatch.setenv(var, value)
    r = nanod(tmp_path / "home", "list")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and words in r.stderr and "Value error" not in r.stderr
