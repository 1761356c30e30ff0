"""End-to-end claims about jobs on several GPUs: a real `nanod run`, the real trainer as two gloo ranks
under real torchrun, real kill -9 and SIGSTOP (promise 13).

The CPU stands in for the GPUs: CUDA_VISIBLE_DEVICES is set but unused, the
locks `gpu0.lock` and `gpu1.lock` are real. Helpers come from test_daemon_e2e.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from daemon import procs
from daemon.gpu import lock as gpulock
from tests.conftest import PYTHON, ROOT, wait_until
from tests.test_daemon_e2e import env, outcomes  # noqa: F401 (env is a fixture)
from trainer import layout

pytestmark = pytest.mark.slow

TWO = {"depth": 2, "max_seq_len": 32, "device_batch_size": 2, "total_batch_size": 256}  # 2 ranks x 2 rows x 2 passes
JOB_ENV = {"OMP_NUM_THREADS": "1", "NANOD_DIST_TIMEOUT": "60"}


def wide_plan(name: str, *, steps: int, save_every: int, phases=("base",), recovery=None) -> dict:
    out = {"name": name, "model_tag": name, "gpus": [0, 1], "env": dict(JOB_ENV),
           "recovery": {"max_restarts_without_progress": 2, "stall_timeout": "20s", "startup_grace": "120s",
                        "kill_grace": "30s", **(recovery or {})},
           "phases": [{"phase": "base", "args": {**TWO, "num_iterations": steps, "save_every": save_every}}]}
    for ph in phases[1:]:
        row = {"max_seq_len": 32} if ph == "mid" else {"max_tokens": 32}
        out["phases"].append({"phase": ph, "args": {**row, "device_batch_size": 2, "total_batch_size": 256,
                                                     "num_iterations": 4, "save_every": 2}})
    return out


def group_of(root) -> tuple[list[int], list[int]]:
    """(keepers, ranks) of trainers writing under `root`, found by their environment and command line."""
    needle = str(root)

    def ours(pid: int) -> bool:
        return procs.environ(pid).get("NANOCHAT_BASE_DIR") == needle
    keepers = procs.find(lambda pid: "daemon.launchers.keeper" in procs.command(pid, 400) and ours(pid))
    ranks = procs.find(lambda pid: "-m trainer " in procs.command(pid, 400) and ours(pid)
                       and "torch.distributed.run" not in procs.command(pid, 400)
                       and "daemon.launchers.keeper" not in procs.command(pid, 400))
    return keepers, ranks


def torchrun_of(keeper: int) -> int | None:
    return next((p for p in procs.descendants(keeper) if procs.parent(p) == keeper), None)


class Watch:
    """Sampled as often as the test polls: never two groups, never a free lock under a live rank."""

    def __init__(self, env):
        self.env, self.seen_keepers, self.max_ranks = env, set(), 0
        self.locks = [env.settings_.gpu_lock_path(i) for i in (0, 1)]

    def check(self) -> None:
        keepers, ranks = group_of(self.env.root)
        assert len(keepers) <= 1 and len(ranks) <= 2, f"two groups at once: keepers {keepers}, ranks {ranks}"
        self.seen_keepers.update(keepers)
        self.max_ranks = max(self.max_ranks, len(ranks))
        if ranks:
            free = [p.name for p in self.locks if not gpulock.is_held(p)]
            assert not free, f"{free} free while ranks {ranks} live"

    def until(self, condition, timeout: float, message: str):
        def step():
            self.check()
            return condition()
        return wait_until(step, timeout, interval=0.02, message=message)


def keeper_of(env, name: str, n: int) -> int | None:
    rec = env.rec(name)
    if rec and len(rec.attempts) >= n and rec.attempts[n - 1].pid and rec.attempts[n - 1].ended_at is None:
        return rec.attempts[n - 1].pid
    return None


def ranks_under(keeper: int) -> list[int]:
    agent = torchrun_of(keeper)
    return sorted(p for p in procs.descendants(keeper) if agent and procs.parent(p) == agent)


def rank_pid(keeper: int, rank: int) -> int | None:
    for pid in ranks_under(keeper):
        if procs.environ(pid).get("RANK") == str(rank):
            return pid
    return None


def final_weights(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_two_gpu_plan_waits_for_a_held_gpu_then_runs_base_mid_sft_holding_both_locks_throughout(env):
    watch = Watch(env)
    hold = subprocess.Popen([PYTHON, "-m", "daemon.cli", "--home", str(env.home), "exec", "--gpu", "1", "--",
                             PYTHON, "-c", "import time; time.sleep(60)"], cwd=ROOT)
    try:
        wait_until(lambda: gpulock.is_held(watch.locks[1]), 20, message="exec to hold GPU 1")
        env.daemon()
        plan = wide_plan("wide", steps=30, save_every=10, phases=("base", "mid", "sft"))
        plan["env"]["NANOD_FAULT_SLOW_STEP_MS"] = "100"   # running long enough to be seen, at little CPU
        env.drop(plan)
        rec = env.wait_state("wide", "waiting", timeout=60)
        assert rec.reason.startswith("waiting for GPU 1's lock, held by pid ") and "time.sleep(60)" in rec.reason
        assert not gpulock.is_held(watch.locks[0]), "the job holds no lock while it waits for another"
    finally:
        hold.kill()
        hold.wait()
    watch.until(lambda: env.state("wide") == "running", 60, "the job to start once GPU 1 is free")
    shown = watch.until(lambda: (out := env.nanod("status").stdout) and "gpu1   locked by pid" in out and out,
                        60, "status to show the job on both GPUs")
    assert "gpus 0, 1 · one rank each through torchrun" in shown
    busy = env.nanod("exec", "--gpu", "1", "--timeout", "0.3", "--", "true")
    assert busy.returncode == 1 and "job wide" in busy.stderr, "exec on either GPU waits for the whole job"
    gpu_lines = [ln for ln in shown.splitlines() if ln.startswith(("gpu0 ", "gpu1 "))]
    assert len(gpu_lines) == 2 and all("(wide)" in ln for ln in gpu_lines), gpu_lines
    watch.until(lambda: env.state("wide") in ("done", "failed"), 300, "the plan to finish")
    rec = env.rec("wide")
    assert rec.state.value == "done", rec.reason
    assert rec.phase_final_steps == {"base": 30, "mid": 4, "sft": 4}
    for phase, step in rec.phase_final_steps.items():
        d = env.ckpt_dir("wide", phase)
        assert layout.is_complete(d, step) and layout.read_meta(d, step)["nanod"]["world_size"] == 2
    assert watch.max_ranks == 2 and len(watch.seen_keepers) == 3, "one group per phase, two ranks each"
    wait_until(lambda: not any(gpulock.is_held(p) for p in watch.locks), 10, message="both locks free at the end")
    header = (env.home / rec.attempts[0].log).read_text().splitlines()[0]
    assert "--nproc_per_node=2 --max-restarts=0 -m trainer base" in header


def test_kill_9_of_one_rank_relaunches_the_group_from_its_newest_checkpoint_with_bitwise_equal_weights(env):
    steps = 60
    args = {**TWO, "num_iterations": steps, "save_every": 10}
    ref = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                          "--max-restarts=0", "-m", "trainer", "base", *(f"--{k}={v}" for k, v in args.items()),
                          "--model_tag=ref"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, **JOB_ENV, "NANOCHAT_BASE_DIR": str(env.root)})
    assert ref.returncode == 0, ref.stderr[-3000:]
    watch = Watch(env)
    env.daemon()
    env.drop(wide_plan("hurt", steps=steps, save_every=10))
    ckpt = env.ckpt_dir("hurt")
    watch.until(lambda: keeper_of(env, "hurt", 1) and (layout.latest_complete(ckpt) or 0) >= 10, 180,
                "attempt 1 past its first checkpoint")
    victim = rank_pid(keeper_of(env, "hurt", 1), 1)
    assert victim, "rank 1 of the group"
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    watch.until(lambda: keeper_of(env, "hurt", 2), 60, "the relaunch")
    relaunched_in = env.rec("hurt").attempts[1].started_at - killed_at
    watch.until(lambda: env.state("hurt") in ("done", "failed"), 300, "the job to finish")
    rec = env.rec("hurt")
    assert rec.state.value == "done", rec.reason
    assert outcomes(rec) == ["crashed", "completed"]
    assert rec.attempts[0].error == "rank 1 was killed by signal 9 (SIGKILL)"
    assert rec.attempts[1].resumed_from >= 10
    assert relaunched_in < 10, f"relaunched {relaunched_in:.1f}s after the rank died"
    a = final_weights(layout.model_path(env.ckpt_dir("ref"), steps))
    b = final_weights(layout.model_path(ckpt, steps))
    import torch
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sigstopped_rank_stalls_the_group_which_is_stopped_together_and_relaunched(env):
    watch = Watch(env)
    env.daemon()
    env.drop(wide_plan("frozen", steps=400, save_every=100, recovery={"stall_timeout": "3s", "kill_grace": "30s"}))
    watch.until(lambda: keeper_of(env, "frozen", 1) and env.rec("frozen").progress, 180, "the first step")
    os.kill(rank_pid(keeper_of(env, "frozen", 1), 1), signal.SIGSTOP)
    watch.until(lambda: env.state("frozen") in ("done", "failed"), 400, "the job to finish")
    rec = env.rec("frozen")
    assert rec.state.value == "done", rec.reason
    assert outcomes(rec)[0] == "stalled" and outcomes(rec)[-1] == "completed"
    assert any(e["kind"] == "stop_stall" for e in rec.events)
    assert not any(e["kind"] == "killed" for e in rec.events), "woken by SIGCONT, the group saved and exited itself"
    assert rec.attempts[1].resumed_from is not None and rec.attempts[1].resumed_from >= 1


def test_kill_9_of_torchrun_then_of_the_daemon_never_leaves_two_groups_or_a_free_lock_under_a_rank(env):
    watch = Watch(env)
    first = env.daemon()
    env.drop(wide_plan("tough", steps=300, save_every=20))
    ckpt = env.ckpt_dir("tough")
    watch.until(lambda: keeper_of(env, "tough", 1) and (layout.latest_complete(ckpt) or 0) >= 20, 180,
                "attempt 1 past a checkpoint")
    ranks = ranks_under(keeper_of(env, "tough", 1))
    os.kill(torchrun_of(keeper_of(env, "tough", 1)), signal.SIGKILL)
    watch.until(lambda: not any(procs.is_alive(r) for r in ranks), 20, "the orphaned ranks to die")
    watch.until(lambda: keeper_of(env, "tough", 2) and (layout.latest_complete(ckpt) or 0) >= 40, 180,
                "attempt 2 past a checkpoint of its own")
    keeper = keeper_of(env, "tough", 2)
    first.kill9()
    watch.check()
    assert procs.is_alive(keeper) and len(ranks_under(keeper)) == 2, "the group outlives the daemon"
    assert all(gpulock.is_held(p) for p in watch.locks), "and keeps both locks"
    env.daemon()
    watch.until(lambda: env.state("tough") in ("done", "failed"), 400, "the job to finish")
    rec = env.rec("tough")
    assert rec.state.value == "done", rec.reason
    assert outcomes(rec) == ["crashed", "interrupted", "completed"]
    assert any(e["kind"] == "survivor" for e in rec.events)
    assert rec.attempts[2].started_at >= rec.attempts[1].ended_at, "the relaunch waited for the survivor's end"
    assert rec.attempts[2].resumed_from >= 40 and len(watch.seen_keepers) == 3


def test_out_of_memory_on_one_rank_backs_off_every_rank_keeping_the_total_batch(env):
    env.daemon()
    plan = wide_plan("tight", steps=8, save_every=4)
    plan["env"].update(NANOD_FAULT_OOM_ABOVE="1", NANOD_FAULT_RANK="1")  # a smaller card in slot 1
    env.drop(plan)
    rec = env.wait_state("tight", "done", "failed", timeout=300)
    assert rec.state.value == "done", rec.reason
    assert outcomes(rec) == ["oom", "completed"], "classified from the ranks' exit, not torchrun's exit 1"
    assert [a.device_batch_size for a in rec.attempts] == [2, 1]
    meta = layout.read_meta(env.ckpt_dir("tight"), 8)
    assert (meta["device_batch_size"], meta["grad_accum_steps"], meta["total_batch_size"]) == (1, 4, 256)
