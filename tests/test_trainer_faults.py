"""Claims about fault injection: what fires, when, and on which attempt."""
from __future__ import annotations

import signal
import subprocess

import pytest

from test_trainer_run import ARGS, Run
from trainer.faults import Faults


def test_crash_and_hang_fire_on_the_first_attempt_only_unless_repeated():
    env = {"NANOD_FAULT_CRASH_AT_STEP": "3", "NANOD_FAULT_HANG_AT_STEP": "5", "NANOD_FAULT_OOM_ABOVE": "2"}
    assert Faults.from_env(env).crash_at == 3 and Faults.from_env({**env, "NANOD_ATTEMPT": "1"}).hang_at == 5
    second = Faults.from_env({**env, "NANOD_ATTEMPT": "2"})
    assert second.crash_at is None and second.hang_at is None and second.oom_above == 2  # a small card stays small
    assert Faults.from_env({**env, "NANOD_ATTEMPT": "2", "NANOD_FAULT_REPEAT": "1"}).crash_at == 3


def test_injected_crash_exits_1_with_a_traceback_after_step_s_minus_1(tmp_path):
    run = Run(tmp_path, "base", *ARGS, tag="crash", env={"NANOD_FAULT_CRASH_AT_STEP": "2"})
    assert run.wait() == 1
    assert "Traceback" in run.err() and "NANOD_FAULT_CRASH_AT_STEP=2" in run.err()
    assert max(run.losses()) == 1


def test_injected_hang_ignores_sigterm_until_sigkill(tmp_path):
    run = Run(tmp_path, "base", *ARGS, tag="hang", env={"NANOD_FAULT_HANG_AT_STEP": "1"})
    run.wait_for_step(0)
    run.proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        run.proc.wait(timeout=1.5)
    run.proc.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
