"""Claims about how the daemon reads a live attempt (daemon/attempts.py): a real process, a log written here."""
from __future__ import annotations

import subprocess
import time

import pytest

from daemon import procs
from daemon.attempt_log import LogTail
from daemon.attempts import Active, Attempts
from daemon.config import ensure_dirs, load_settings
from daemon.queue import Attempt, JobState, Queue
from daemon.launchers.local import LocalProcess
from daemon.trainers.builtin import BuiltinTrainer
from daemon.spec import parse_job
from tests.conftest import PYTHON


@pytest.fixture
def watched(nanod_home, nanochat_dir):
    """A queued job whose attempt is a sleeping process and whose log the test writes."""
    settings = load_settings(nanod_home)
    ensure_dirs(settings)
    queue = Queue(settings)
    spec = parse_job({"recovery": {"stall_timeout": "1s", "startup_grace": "1s"},
                      "phases": [{"phase": "base", "args": {"depth": 2, "num_iterations": 50}}]}, default_name="p")
    rec = queue.add(spec)
    log = settings.logs_dir / "p" / "attempt-001.log"
    log.parent.mkdir(parents=True)
    log.write_text("")
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"], start_new_session=True)
    queue.begin_attempt(rec, Attempt(n=1, phase="base", pid=sleeper.pid, started_at=time.time(),
                                     log=str(log.relative_to(settings.home))))
    queue.transition(rec, JobState.RUNNING, "phase base, attempt 1")
    attempts = Attempts(settings, queue)
    proc = LocalProcess(sleeper.pid, sleeper.pid, procs.start_ticks(sleeper.pid), sleeper)
    attempts.active["p"] = Active(rec=rec, proc=proc, adapter=BuiltinTrainer(settings), phase="base",
                                  ckpt_dir=nanochat_dir / "none", tail=LogTail(log), since=time.time(),
                                  start_ckpt=None, last_ckpt=None, last_activity=time.monotonic())
    yield attempts, rec, log
    sleeper.kill()
    sleeper.wait()


def write(log, text):
    with open(log, "a") as f:
        f.write(text)


def test_a_paused_line_pauses_the_job_with_that_reason_and_suspends_stall_detection(watched):
    attempts, rec, log = watched
    write(log, "step 00001/00050 (2.00%) | loss: 5.0 | dt: 10.00ms | tok/sec: 1,000\n"
               "paused: waiting for disk space (need 2.0GB, 1.0GB free)\n")
    attempts.read_progress()
    assert rec.state == JobState.PAUSED and rec.reason.startswith("paused: waiting for disk space")
    attempts.active["p"].last_activity -= 60  # long past stall_timeout
    attempts.detect_stalls()
    assert attempts.active["p"].stop is None, "no stall while paused"
    write(log, "resumed: disk space available\nstep 00002/00050 (4.00%) | loss: 4.9 | dt: 10.00ms | tok/sec: 1,000\n")
    attempts.read_progress()
    assert rec.state == JobState.RUNNING and rec.progress["step"] == 3  # steps done after the line of step 2


def test_progress_reaches_the_record_at_most_twice_a_second_with_every_loss_kept(watched):
    attempts, rec, log = watched
    for step in range(1, 4):
        write(log, f"step {step:05d}/00050 (1.00%) | loss: {5 - step / 10} | dt: 10.00ms | tok/sec: 1,000\n")
        attempts.read_progress()
    from daemon.queue import load_job
    on_disk = load_job(attempts.settings, "p")
    assert on_disk.progress["step"] == 2, "written once, then throttled"
    assert [s for s, _ in rec.progress["losses"]] == [2, 3, 4]
    attempts.active["p"].saved_at -= 1
    attempts.read_progress()
    assert load_job(attempts.settings, "p").progress["step"] == 4


def test_a_silent_attempt_is_stopped_as_stalled_after_startup_grace(watched):
    attempts, rec, log = watched
    attempts.active["p"].last_activity -= 5
    attempts.detect_stalls()
    a = attempts.active["p"]
    assert a.stop == "stall" and a.kill_at is not None
    deadline = time.monotonic() + 10
    while not a.proc.poll() and time.monotonic() < deadline:
        time.sleep(0.05)
    attempts.reap()
    assert rec.last_attempt.outcome == "stalled" and rec.state == JobState.BACKING_OFF


def test_an_auto_phase_reuses_an_earlier_auto_choice_only_for_the_same_shape(nanod_home, nanochat_dir):
    settings = load_settings(nanod_home)
    ensure_dirs(settings)
    queue = Queue(settings)
    row = {"max_seq_len": 32, "total_batch_size": 256, "device_batch_size": "auto"}
    spec = parse_job({"phases": [{"phase": "base", "args": {"depth": 2, **row}},
                                 {"phase": "mid", "args": dict(row)},
                                 {"phase": "sft", "args": {"max_tokens": 64, "total_batch_size": 256,
                                                           "device_batch_size": "auto"}}]}, default_name="a")
    rec = queue.add(spec)
    attempts = Attempts(settings, queue)
    assert attempts._batch_size(rec) is None                     # nothing chosen yet: the trainer probes
    rec.device_batch_size["base"] = 4                             # base's auto-fit chose 4
    assert attempts._batch_size(rec) == 4                         # its own next attempt: given
    rec.phase_index = 1
    assert attempts._batch_size(rec) == 4                         # mid: same model, rows and GPUs
    assert rec.events[-1]["kind"] == "autofit" and "from base's auto-fit" in rec.events[-1]["message"]
    assert attempts._batch_size(rec) == 4 and sum(e["kind"] == "autofit" for e in rec.events) == 1   # said once
    rec.device_batch_size["mid"] = 2                              # an OOM lowered mid's
    rec.phase_index = 2
    assert attempts._batch_size(rec) is None                      # sft's rows are 64 tokens: probe again
    spec8 = parse_job({"phases": [{"phase": "base", "args": {"depth": 2, "device_batch_size": "auto"}},
                                  {"phase": "mid", "args": {"device_batch_size": 16}}]}, default_name="b")
    rec8 = queue.add(spec8)
    rec8.device_batch_size["base"], rec8.phase_index = 8, 1
    assert attempts._batch_size(rec8) == 16                       # an auto phase's choice caps no given value


def test_the_trainers_auto_fit_line_becomes_the_attempts_batch_that_an_oom_halves(watched):
    from daemon import supervisor
    from daemon.trainers import Outcome
    attempts, rec, log = watched
    write(log, "auto-fit: device_batch_size 8 (probed 16 no, 8 yes in 0.5s; peak 6.9/8.0 GiB = 86%)\n")
    attempts.read_progress()
    assert (rec.last_attempt.device_batch_size, rec.device_batch_size) == (8, {"base": 8})
    assert rec.events[-1]["kind"] == "autofit" and rec.events[-1]["message"].startswith("base: auto-fit: device_batch_size 8")
    d = supervisor.decide(Outcome.OOM, phase="base", phase_index=0, n_phases=1, recovery=rec.job_spec.recovery,
                          restarts_without_progress=0, progressed=False,
                          device_batch_size=rec.last_attempt.device_batch_size, exit_words="exit 3", error="")
    assert d.device_batch_size == 4
