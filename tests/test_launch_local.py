"""Claims about starting, reading and killing attempts (daemon/launchers/, daemon/attempt_log.py,
daemon/trainers/builtin.py)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from daemon import procs
from daemon.attempt_log import LogTail, last_error_line
from daemon.attempts import newest_checkpoint
from daemon.config import load_settings
from daemon.launchers import attempt_env
from daemon.launchers.local import LocalLauncher, LocalProcess, start_process
from daemon.trainers import Outcome
from daemon.trainers.builtin import BuiltinTrainer, parse_step_line
from daemon.spec import parse_job
from tests.conftest import PYTHON, wait_until
from trainer import layout


def plan(**extra):
    data = {"env": {"JOB": "job", "SHARED": "job"},
            "phases": [{"phase": "base", "args": {"depth": 2}},
                       {"phase": "mid", "args": {"device_batch_size": 4}, "env": {"SHARED": "phase"}}]}
    data.update(extra)
    return parse_job(data, default_name="j")


def test_the_attempts_environment_is_cleaned_defaulted_and_then_the_jobs(nanod_home, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/x")
    monkeypatch.setenv("WATCHDOG_USEC", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    settings = load_settings(nanod_home)
    trainer = BuiltinTrainer(settings)

    def env(spec, i, n, trainer_env):
        rec = type("Rec", (), {"job_spec": spec})()
        return attempt_env(settings, spec, i, n, trainer_env=trainer_env,
                           defaults=trainer.default_env(spec.phases[i].phase),
                           place_env=LocalLauncher(settings).place_env(rec))
    base = env(plan(), 0, 3, {"PYTHONPATH": "/x"})
    mid = env(plan(gpu=1), 1, 4, {})
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS"} & set(base)
    assert base["PYTORCH_ALLOC_CONF"] == "expandable_segments:True" and "TORCH_COMPILE_DISABLE" not in base
    assert (base["NANOD_ATTEMPT"], base["CUDA_VISIBLE_DEVICES"], base["PYTHONUNBUFFERED"]) == ("3", "0", "1")
    assert base["NANOCHAT_BASE_DIR"] == str(settings.checkpoint_root) and base["SHARED"] == "job"
    assert (mid["TORCH_COMPILE_DISABLE"], mid["CUDA_VISIBLE_DEVICES"], mid["SHARED"]) == ("1", "1", "phase")


def test_step_lines_parse_as_steps_done_and_other_lines_do_not():
    p = parse_step_line("step 00012/00040 (30.00%) | loss: 4.123456 | lrm: 1.00 | dt: 81.00ms | tok/sec: 2,521"
                        " | peak_mem: 3.20GiB")
    # the line of step 12 (0-based) comes after it: 13 steps are done
    assert (p.step, p.total, p.loss, p.dt_ms, p.tok_per_sec, p.peak_mem_gib) == (13, 40, 4.123456, 81.0, 2521.0, 3.2)
    assert parse_step_line("saved checkpoint step 10") is None
    assert parse_step_line("stepping") is None


def test_exit_codes_and_oom_texts_classify():
    r = BuiltinTrainer(load_settings("/tmp/nanod-unused"))
    assert r.classify_exit(0, "") == Outcome.COMPLETED
    assert r.classify_exit(2, "") == Outcome.BAD_ARGS
    assert r.classify_exit(3, "") == Outcome.OOM
    assert r.classify_exit(4, "") == Outcome.INTERRUPTED
    assert r.classify_exit(1, "torch.OutOfMemoryError: CUDA out of memory") == Outcome.OOM
    assert r.classify_exit(-9, "") == Outcome.CRASHED


def test_relaunches_resume_and_later_phases_start_from_the_previous_final_step(tmp_path):
    r = BuiltinTrainer(load_settings(tmp_path))
    argv = r.build_launch(plan(), 1, args={"device_batch_size": 2}, resume_from=None, init_from=40).argv
    assert argv[1:4] == ["-m", "trainer", "mid"]
    assert "--device_batch_size=2" in argv and "--init_step=40" in argv and "--model_tag=d2" in argv
    three = parse_job({"phases": [{"phase": "base"}, {"phase": "sft"}]}, default_name="j")
    assert "--source=base" in r.build_launch(three, 1, args={}, resume_from=None, init_from=7).argv
    argv = r.build_launch(plan(), 0, args={}, resume_from=20, init_from=None).argv
    assert "--resume_from_step=20" in argv and not any(a.startswith("--init_step") for a in argv)


def test_the_log_tail_waits_for_a_whole_line_and_survives_truncation(tmp_path):
    path = tmp_path / "a.log"
    tail = LogTail(path)
    assert tail.read_lines() == []
    with open(path, "ab") as f:
        f.write(b"step 1\nste")
    assert tail.read_lines() == ["step 1"]
    with open(path, "ab") as f:
        f.write(b"p 2\n")
    assert tail.read_lines() == ["step 2"]
    path.write_bytes(b"new\n")
    assert tail.read_lines() == ["new"]


def test_newest_checkpoint_skips_torn_and_stale_ones(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()

    def save(step, meta=True):
        layout.model_path(d, step).write_bytes(b"m")
        layout.optim_path(d, step).write_bytes(b"o")
        if meta:
            layout.meta_path(d, step).write_text(json.dumps({"step": step}))

    save(100)  # an older job's
    old = time.time() - 3600
    for p in layout.files_of(d, 100):
        os.utime(p, (old, old))
    save(10)
    save(20, meta=False)  # torn: no meta
    assert newest_checkpoint(d) == 100
    assert newest_checkpoint(d, since=time.time() - 60) == 10


def test_an_attempt_runs_in_its_own_group_logs_to_its_file_and_a_stopped_group_still_dies(tmp_path):
    script = ("import subprocess, sys, time; print('hello', flush=True); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    log = tmp_path / "logs" / "attempt-001.log"
    proc = start_process([PYTHON, "-c", script], dict(os.environ), log, header="test")
    try:
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        wait_until(lambda: "hello" in log.read_text(), 10, message="the child's output in its log")
        wait_until(lambda: len(procs.group_pids(proc.pgid)) == 2, 10, message="the grandchild")
        os.killpg(proc.pgid, signal.SIGSTOP)
        proc.terminate()
        wait_until(proc.poll, 10, message="SIGTERM+SIGCONT to end a stopped group")
        assert proc.returncode == -signal.SIGTERM
        wait_until(lambda: not procs.group_pids(proc.pgid), 10, message="the whole group gone")
        assert log.read_text().startswith("# nanod: test")
    finally:
        proc.kill()


def test_a_survivor_is_adopted_only_if_it_is_the_same_process(tmp_path):
    me = os.getpid()
    start = procs.start_ticks(me)
    raw = open(f"/proc/{me}/stat").read()
    assert start == int(raw[raw.rindex(")") + 2:].split()[19])  # records keep /proc's starttime (schema 1)
    assert LocalProcess.adopt(me, os.getpgid(me), start) is not None
    assert LocalProcess.adopt(me, os.getpgid(me), start + 1) is None  # a reused pid
    assert LocalProcess.adopt(2 ** 22 + 7, None, None) is None


def test_a_command_that_cannot_start_raises(tmp_path):
    with pytest.raises(OSError):
        start_process([str(tmp_path / "no-such-python")], {}, tmp_path / "x.log")


def test_the_last_error_line_skips_progress_chatter():
    tail = "step 1/2 | loss: 1\nTraceback (most recent call last):\nRuntimeError: boom\nstep 2/2 | loss: 1\n"
    assert last_error_line(tail) == "RuntimeError: boom"
