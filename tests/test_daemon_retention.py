"""End-to-end claims about keep_last under a real daemon and the real trainer (promise 10).

The tiny CPU trainer saves every 2 steps about every 50 ms, far faster than the
daemon's 1 s checkpoint scan, so these runs are the issue's case: checkpoints
that come faster than the scan, and attempts killed right after a save. A
hanging fault (NANOD_FAULT_HANG_AT_STEP) freezes the folder at each moment a
user can look, so the tests see exactly what the user would.
"""
from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import wait_until
from tests.test_daemon_e2e import env, plan  # noqa: F401 (env is a fixture)
from tests.test_daemon_recovery import attempt_pid
from trainer import layout

pytestmark = pytest.mark.slow

HANG_21 = {"NANOD_FAULT_HANG_AT_STEP": "21"}   # saves 2..20, then hangs before step 21 (SIGTERM ignored)


def complete_steps(d) -> list[int]:
    return [s for s in layout.list_steps(d) if layout.is_complete(d, s)]


def keep_two(job: dict) -> dict:
    job["retention"] = {"keep_last": 2}
    return job


def test_a_trainer_killed_right_after_a_save_leaves_keep_last_before_the_next_attempt_runs(env):
    env.daemon()
    # every attempt hangs at 21: attempt 2 resumes from 20 and hangs before saving anything new
    env.drop(keep_two(plan("loop", steps=30, save_every=2, env={**HANG_21, "NANOD_FAULT_REPEAT": "1"},
                           recovery={"stall_timeout": "300s", "kill_grace": "2s"})))
    ckpt = env.ckpt_dir("loop")
    wait_until(lambda: attempt_pid(env, "loop", 1) and layout.latest_complete(ckpt) == 20, 120,
               message="attempt 1's save of step 20")
    os.kill(attempt_pid(env, "loop", 1), signal.SIGKILL)   # right after its save, before a scan sees it
    wait_until(lambda: attempt_pid(env, "loop", 2), 60, message="attempt 2")
    assert env.rec("loop").attempts[1].resumed_from == 20
    # attempt 2 runs and adds nothing: this is the folder a user sees after attempt 1 ended
    assert layout.list_steps(ckpt) == [18, 20], env.rec("loop").events[-5:]
    assert any(e["kind"] == "pruned" for e in env.rec("loop").events)


def test_a_crash_loop_that_makes_progress_ends_done_with_only_keep_last(env):
    env.daemon()
    env.drop(keep_two(plan("crashy", steps=30, save_every=2, env={"NANOD_FAULT_CRASH_AT_STEP": "21"})))
    rec = env.wait_state("crashy", "done", "failed", timeout=150)
    assert rec.state.value == "done", rec.reason
    assert [a.outcome for a in rec.attempts] == ["crashed", "completed"]
    assert layout.list_steps(env.ckpt_dir("crashy")) == [28, 30]
    kinds = [e["kind"] for e in rec.events]
    assert kinds.index("done") > max(i for i, k in enumerate(kinds) if k == "pruned"), \
        "pruned before the job reads done: whoever sees it done finds keep_last held"


def test_keep_last_holds_after_a_daemon_restart_and_after_a_phase_ends(env):
    first = env.daemon()
    job = keep_two(plan("again", steps=30, save_every=2, phases=("base", "mid"),
                        recovery={"stall_timeout": "300s", "kill_grace": "5s"}))
    job["phases"][0]["env"] = HANG_21                                   # attempt 1 only
    job["phases"][1]["env"] = {"NANOD_FAULT_HANG_AT_STEP": "1", "NANOD_FAULT_REPEAT": "1"}  # mid freezes
    env.drop(job)
    base = env.ckpt_dir("again")
    wait_until(lambda: attempt_pid(env, "again", 1), 60, message="attempt 1")
    first.kill9()   # before any checkpoint: no daemon sees the saves
    wait_until(lambda: layout.latest_complete(base) == 20, 120, message="the orphaned trainer's step 20")
    assert complete_steps(base) == list(range(2, 21, 2))
    env.daemon()    # up = recover() has run; the survivor still hangs (SIGTERM ignored until kill_grace)
    assert attempt_pid(env, "again", 1), "the survivor is still being stopped"
    assert layout.list_steps(base) == [18, 20]
    # the survivor is SIGKILLed, attempt 2 resumes from 20 and completes base; mid then hangs at step 1
    wait_until(lambda: env.rec("again").phase_index == 1 and attempt_pid(env, "again", 3), 150,
               message=f"mid's attempt ({env.rec('again').reason})")
    rec = env.rec("again")
    assert rec.phase_final_steps == {"base": 30} and rec.attempts[2].init_from == 30
    assert layout.list_steps(base) == [28, 30]
