"""End-to-end claims about recovery: kill -9 of the trainer and of the daemon, SIGSTOP, graceful stop."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from daemon.gpu import lock as gpulock
from tests.conftest import PYTHON, ROOT, wait_until
from tests.test_daemon_e2e import TINY, env, outcomes, plan, trainer_pids  # noqa: F401 (env is a fixture)
from trainer import layout

pytestmark = pytest.mark.slow


def attempt_pid(env, name: str, n: int) -> int | None:
    rec = env.rec(name)
    if rec and len(rec.attempts) >= n and rec.attempts[n - 1].pid and rec.attempts[n - 1].ended_at is None:
        return rec.attempts[n - 1].pid
    return None


def final_weights(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def test_kill_9_of_the_trainer_again_and_again_ends_with_bitwise_identical_weights(env):
    steps = 24
    args = {**TINY, "num_iterations": steps, "save_every": 4}
    ref = subprocess.run([PYTHON, "-m", "trainer", "base", *(f"--{k}={v}" for k, v in args.items()), "--model_tag=ref"],
                         capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert ref.returncode == 0, ref.stderr[-2000:]
    env.daemon()
    env.drop(plan("hurt", steps=steps, save_every=4))
    ckpt = env.ckpt_dir("hurt")
    for n, after_step in ((1, 4), (2, 12)):
        wait_until(lambda: attempt_pid(env, "hurt", n) and (layout.latest_complete(ckpt) or 0) >= after_step, 120,
                   message=f"attempt {n} past step {after_step}")
        os.kill(attempt_pid(env, "hurt", n), signal.SIGKILL)
    rec = env.wait_state("hurt", "done", "failed", timeout=150)
    assert rec.state.value == "done", rec.reason
    assert outcomes(rec)[:2] == ["crashed", "crashed"] and outcomes(rec)[-1] == "completed"
    assert rec.attempts[1].resumed_from >= 4 and rec.attempts[2].resumed_from >= 12
    a = final_weights(layout.model_path(env.ckpt_dir("ref"), steps))
    b = final_weights(layout.model_path(ckpt, steps))
    import torch
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sigstopped_trainer_is_found_stalled_its_group_killed_and_the_job_relaunched(env):
    env.daemon()
    # slow steps (a sleep, not CPU): it cannot finish between its first recorded step and the SIGSTOP on a
    # busy machine, and the relaunch's 60 steps cost the suite little
    env.drop(plan("frozen", steps=60, save_every=50, env={"NANOD_FAULT_SLOW_STEP_MS": "100"},
                  recovery={"stall_timeout": "2s", "kill_grace": "10s"}))
    wait_until(lambda: attempt_pid(env, "frozen", 1) and env.rec("frozen").progress, 120, message="first step")
    pid = attempt_pid(env, "frozen", 1)
    os.kill(pid, signal.SIGSTOP)
    rec = env.wait_state("frozen", "done", "failed", timeout=150)
    assert rec.state.value == "done", rec.reason
    assert outcomes(rec)[0] == "stalled" and outcomes(rec)[-1] == "completed"
    assert any(e["kind"] == "stop_stall" for e in rec.events) and any(e["kind"] == "stalled" for e in rec.events)


def test_kill_9_of_the_daemon_mid_job_then_a_restart_completes_it_never_two_trainers(env):
    first = env.daemon()
    env.drop(plan("orphan", steps=30, save_every=4))
    ckpt = env.ckpt_dir("orphan")
    wait_until(lambda: attempt_pid(env, "orphan", 1) and layout.latest_complete(ckpt), 120, message="a checkpoint")
    survivor = attempt_pid(env, "orphan", 1)
    first.kill9()
    assert trainer_pids(env.root) == [survivor], "the trainer outlives the daemon"
    assert gpulock.is_held(env.settings_.gpu_lock_path(0)), "and keeps the GPU lock"
    env.daemon()
    seen = set()

    def finished_with_one_trainer_at_a_time():
        alive = trainer_pids(env.root)
        assert len(alive) <= 1, f"two trainers at once: {alive}"
        seen.update(alive)
        return env.state("orphan") in ("done", "failed")

    wait_until(finished_with_one_trainer_at_a_time, 150, interval=0.02, message="the job to finish")
    rec = env.rec("orphan")
    assert rec.state.value == "done", rec.reason
    assert outcomes(rec) == ["interrupted", "completed"] and len(seen) == 2
    assert rec.attempts[1].resumed_from >= 4
    assert rec.attempts[1].started_at >= rec.attempts[0].ended_at, "the relaunch waited for the survivor's end"
    assert any(e["kind"] == "survivor" for e in rec.events)


def test_sigterm_to_the_daemon_saves_an_emergency_checkpoint_requeues_and_the_next_run_finishes(env):
    d = env.daemon()
    env.drop(plan("warm", steps=40, save_every=1000))
    wait_until(lambda: ((env.rec("warm") and env.rec("warm").progress) or {}).get("step", 0) >= 3, 120,
               message="a few steps")
    assert d.stop() == 0
    rec = env.rec("warm")
    assert rec.state.value == "queued" and outcomes(rec) == ["interrupted"]
    saved = layout.latest_complete(env.ckpt_dir("warm"))
    assert saved is not None and saved > rec.progress["step"] - 1, "an emergency checkpoint at the current step"
    assert not trainer_pids(env.root) and not gpulock.is_held(env.settings_.gpu_lock_path(0))
    env.daemon()
    rec = env.wait_state("warm", "done", "failed", timeout=120)
    assert rec.state.value == "done" and rec.attempts[1].resumed_from == saved
