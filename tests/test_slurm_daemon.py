"""End-to-end claims about jobs on SLURM (promise 14): a real `nanod run`, a real one-node SLURM cluster
(slurmctld, slurmd, munge as root: tests/slurm_cluster.py), the built-in trainer on the CPU, real requeues,
time limits, kill -9 and scancel.

Skipped, with the reason, where no private cluster can start (not root, slurm-wlm/munge missing).
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time

import pytest

from tests.conftest import PYTHON, ROOT, wait_until
from tests.test_daemon_e2e import env, outcomes  # noqa: F401 (env is a fixture)
from trainer import layout

pytestmark = pytest.mark.slow

TINY = {"depth": 2, "max_seq_len": 32, "device_batch_size": 4, "total_batch_size": 128}
JOB_ENV = {"OMP_NUM_THREADS": "1"}


def slurm_plan(name: str, *, steps: int, save_every: int, phases=("base",), slurm=None, env=None,
               recovery=None) -> dict:
    out = {"name": name, "model_tag": name, "env": {**JOB_ENV, **(env or {})},
           "slurm": {"partition": "debug", **(slurm or {})},
           "recovery": {"max_restarts_without_progress": 2, "stall_timeout": "30s", "startup_grace": "120s",
                        "kill_grace": "20s", **(recovery or {})},
           "phases": [{"phase": "base", "args": {**TINY, "num_iterations": steps, "save_every": save_every}}]}
    for ph in phases[1:]:
        row = {"max_seq_len": 32} if ph == "mid" else {"max_tokens": 32}
        out["phases"].append({"phase": ph, "args": {**row, "device_batch_size": 4, "total_batch_size": 128,
                                                     "num_iterations": 4, "save_every": 2}})
    return out


@pytest.fixture
def cluster(slurm_cluster, env, monkeypatch):
    """The session's cluster for this test's daemons and commands; every job cancelled at the end."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.setenv("NANOD_SLURM_POLL_INTERVAL", "0.5s")
    slurm_cluster.cancel_all()
    yield slurm_cluster
    slurm_cluster.cancel_all()


class Allocations:
    """Sampled as often as a test polls: never two live batch jobs of one nanod job."""

    def __init__(self, cluster, job: str):
        self.cluster, self.job, self.seen = cluster, job, set()

    def check(self) -> None:
        live = [(i, n, s) for i, n, s in self.cluster.jobs() if n.startswith(f"{self.job}.a")]
        assert len(live) <= 1, f"two allocations of {self.job} at once: {live}"
        self.seen.update(i for i, _, _ in live)

    def until(self, condition, timeout: float, message: str):
        def step():
            self.check()
            return condition()
        return wait_until(step, timeout, interval=0.1, message=message)


def slurm_id(rec, n: int = -1) -> str:
    return rec.attempts[n].slurm["job_id"]


def reference(env, name: str, phases: list[tuple[str, dict]]) -> None:
    """The same phases run by hand on this machine, under model_tag `name` (the local run to compare with)."""
    for phase, args in phases:
        r = subprocess.run([PYTHON, "-m", "trainer", phase, *(f"--{k}={v}" for k, v in args.items()),
                            f"--model_tag={name}"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, **JOB_ENV, "NANOCHAT_BASE_DIR": str(env.root)})
        assert r.returncode == 0, r.stderr[-3000:]


def weights(env, tag: str, phase: str, step: int):
    import torch
    return torch.load(layout.checkpoint_dir(env.root, phase, tag) / f"model_{step:06d}.pt", map_location="cpu",
                      weights_only=True)


def assert_bitwise(a: dict, b: dict) -> None:
    import torch
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def step_lines(log_text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^step (\d+)/", log_text, re.M)]


# ---- the claims ----------------------------------------------------------------------------
def test_a_plan_on_slurm_runs_each_phase_as_a_batch_job_and_ends_bitwise_equal_to_a_local_run(env, cluster):
    d = env.daemon()
    job = slurm_plan("onslurm", steps=8, save_every=4, phases=("base", "mid"))
    env.drop(job)
    allocs = Allocations(cluster, "onslurm")
    rec = allocs.until(lambda: (r := env.rec("onslurm")) and r.attempts and r.attempts[-1].slurm and r, 60,
                       "the first batch job")
    shown = allocs.until(lambda: (out := env.nanod("status", "--json").stdout) and '"job_id"' in out and out, 60,
                         "status to show the SLURM job")
    j = next(x for x in json.loads(shown)["jobs"] if x["name"] == "onslurm")
    assert j["slurm"]["job_id"] == slurm_id(rec) and j["gpus"] == [] and j["gpu"] is None
    allocs.until(lambda: env.state("onslurm") in ("done", "failed"), 200, "the plan to finish")
    rec = env.rec("onslurm")
    assert rec.state.value == "done", rec.reason
    assert rec.phase_final_steps == {"base": 8, "mid": 4}
    assert [a.outcome for a in rec.attempts] == ["completed", "completed"]
    ids = [a.slurm["job_id"] for a in rec.attempts]
    assert len(set(ids)) == 2 and all(a.slurm["state"] == "COMPLETED" for a in rec.attempts)
    assert all(a.slurm["node"] == cluster.host for a in rec.attempts)
    assert not list((env.settings_.lock_dir).glob("gpu*.lock")), "a SLURM job takes no local GPU lock"
    script = env.home / "slurm" / "onslurm" / "attempt-001.sh"
    assert stat.S_IMODE(script.stat().st_mode) == 0o600
    text = script.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --partition=debug", f"#SBATCH --job-name=onslurm.a1.nanod"):
        assert line in text
    assert "--resume_from_step=auto" in text
    log = (env.home / rec.attempts[0].log).read_text()
    assert f"# nanod: slurm job {ids[0]} the trainer exited with code 0" in log
    assert cluster.job(ids[0]).get("JobName", "").startswith("onslurm.a1.nanod")
    d.stop()
    reference(env, "ref", [("base", {**TINY, "num_iterations": 8, "save_every": 4}),
                           ("mid", {**job["phases"][1]["args"]})])
    assert_bitwise(weights(env, "onslurm", "mid", 4), weights(env, "ref", "mid", 4))


def requeue_and_restart(cluster, job_id: str, log, allocs: Allocations, runs: int) -> dict:
    """`scontrol requeue`, then start it at once (SLURM would wait ~2 min); timings of each stage."""
    t0 = time.monotonic()
    cluster.run("scontrol", "requeue", job_id)
    allocs.until(lambda: cluster.job(job_id).get("JobState") == "PENDING", 60, "the job to pend after its requeue")
    t1 = time.monotonic()
    wait_until(lambda: cluster.start_now(job_id), 30, message="the requeued job to be startable")
    mark = f"# nanod: slurm job {job_id} run {runs} on"
    allocs.until(lambda: (text := log.read_text()) and mark in text
                 and step_lines(text[text.index(mark):]), 120, "a step line of the requeued run")
    return {"killed_s": t1 - t0, "training_again_s": time.monotonic() - t1}


def test_scontrol_requeue_mid_run_resumes_within_save_every_when_killed_and_losing_nothing_when_signalled(env, cluster):
    """Run 1 hangs ignoring SIGTERM (SIGKILL after KillWait: back to step 10, at most save_every lost); run 2
    is requeued while training (SIGTERM: an emergency checkpoint, nothing lost); run 3 finishes, bitwise equal
    to an uninterrupted local run. One attempt throughout: SLURM requeued the same batch job."""
    steps, save_every = 40, 5
    env.daemon()
    env.drop(slurm_plan("requeued", steps=steps, save_every=save_every,
                        env={"NANOD_FAULT_HANG_AT_STEP": "13", "NANOD_FAULT_SLOW_STEP_MS": "150"}))
    allocs = Allocations(cluster, "requeued")
    rec = allocs.until(lambda: (r := env.rec("requeued")) and r.attempts and r.attempts[-1].slurm and r, 60,
                       "the batch job")
    job_id, log = slurm_id(rec), env.home / rec.attempts[0].log
    allocs.until(lambda: 13 - 1 in step_lines(log.read_text()), 120, "run 1 to reach its hang at step 13")
    allocs.until(lambda: env.state("requeued") == "running", 30, "the job to show running")
    hard = requeue_and_restart(cluster, job_id, log, allocs, runs=2)
    text = log.read_text()
    assert "resumed from step 10 " in text[text.index(f"slurm job {job_id} run 2 on"):], text[-2000:]
    lost_hard = 13 - 10
    allocs.until(lambda: (r := env.rec("requeued")) and r.attempts[0].slurm["restarts"] == 1
                 and r.state.value == "running", 30, "the daemon to follow the restarted run")
    rec = env.rec("requeued")
    assert any(e["kind"] == "slurm_requeue" for e in rec.events) and any(e["kind"] == "waiting" for e in rec.events)
    run2 = lambda: (t := log.read_text())[t.index(f"slurm job {job_id} run 2 on"):]   # noqa: E731
    allocs.until(lambda: max(step_lines(run2()), default=0) >= 20, 60, "run 2 to train past step 20")
    soft = requeue_and_restart(cluster, job_id, log, allocs, runs=3)
    text = log.read_text()
    cut = text.index(f"slurm job {job_id} run 3 on")
    done_before = max(step_lines(text[text.index(f"slurm job {job_id} run 2 on"):cut])) + 1
    run3 = text[cut:]
    saved = re.search(r"resumed from step (\d+) ", run3)
    assert saved and int(saved.group(1)) == done_before, "the signalled run saved the step it was at: 0 lost"
    allocs.until(lambda: env.state("requeued") in ("done", "failed"), 120, "the job to finish")
    rec = env.rec("requeued")
    assert rec.state.value == "done", rec.reason
    assert len(rec.attempts) == 1 and rec.attempts[0].outcome == "completed" and rec.attempts[0].slurm["restarts"] == 2
    assert allocs.seen == {job_id}
    print(f"\nSLURM requeue: hard (SIGKILL after KillWait) lost {lost_hard} steps (save_every {save_every}), "
          f"killed in {hard['killed_s']:.1f}s, training again {hard['training_again_s']:.1f}s after it pended; "
          f"graceful lost 0, killed in {soft['killed_s']:.1f}s, training again {soft['training_again_s']:.1f}s")
    assert soft["killed_s"] + soft["training_again_s"] < 30, "pre-emption -> training again < scheduler delay + 30 s"
    reference(env, "ref", [("base", {**TINY, "num_iterations": steps, "save_every": save_every})])
    assert_bitwise(weights(env, "requeued", "base", steps), weights(env, "ref", "base", steps))


def test_near_the_time_limit_the_trainer_saves_and_the_job_requeues_itself_until_done(env, cluster):
    """--time=1 (a minute) with checkpoint_grace 20s: USR1 to the script, SIGTERM to the trainer, an emergency
    checkpoint, `scontrol requeue` by the script itself, and the next run resumes from it: nothing lost."""
    env.daemon()
    # 180 steps of >= 200 ms: more than a run gets before its signal (~25-30 s in; under load three or four
    # runs). A signal that lands as a run's trainer exits is requeued by the script too (test_slurm.py's
    # race tests), so however the runs fall it stays one attempt, one batch job
    env.drop(slurm_plan("limited", steps=180, save_every=50, slurm={"time": "1", "checkpoint_grace": "20s"},
                        env={"NANOD_FAULT_SLOW_STEP_MS": "200"}))
    allocs = Allocations(cluster, "limited")
    rec = allocs.until(lambda: (r := env.rec("limited")) and r.attempts and r.attempts[-1].slurm and r, 60,
                       "the batch job")
    job_id, log = slurm_id(rec), env.home / rec.attempts[0].log

    def finished() -> bool:
        cluster.start_now(job_id)   # once pending: the requeue's ~2 min wait is SLURM's; the test does not wait it
        return env.state("limited") in ("done", "failed")
    allocs.until(finished, 400, "the job to finish through its time limits")
    rec = env.rec("limited")
    assert rec.state.value == "done", rec.reason
    text = log.read_text()
    assert "time limit near: SIGTERM to the trainer" in text and "requeueing itself" in text
    assert "DUE TO TIME LIMIT" not in text, "the trainer stopped before SLURM's kill"
    runs = text.split(f"# nanod: slurm job {job_id} run ")[1:]
    assert len(runs) >= 2 and rec.attempts[0].slurm["restarts"] == len(runs) - 1
    for before, after in zip(runs, runs[1:]):
        done = max(step_lines(before)) + 1
        assert f"resumed from step {done} " in after, "each run resumed from the step the previous one saved"
    assert len(rec.attempts) == 1 and rec.attempts[0].outcome == "completed" and allocs.seen == {job_id}


def test_a_time_limit_warning_that_lands_as_the_trainer_exits_stays_one_attempt_and_one_batch_job(env, cluster):
    """The warning (USR1, sent here by hand) right after the trainer's last line: its SIGTERM lands as the
    trainer exits, which kills it (143: Python puts SIGTERM back to the default at exit). The script
    requeues, the next run resumes from the final checkpoint and completes: not a crash, not a second job."""
    env.daemon()
    env.drop(slurm_plan("warned", steps=6, save_every=50, slurm={"time": "10", "checkpoint_grace": "20s"}))
    allocs = Allocations(cluster, "warned")
    rec = allocs.until(lambda: (r := env.rec("warned")) and r.attempts and r.attempts[-1].slurm and r, 60,
                       "the batch job")
    job_id, log = slurm_id(rec), env.home / rec.attempts[0].log
    allocs.until(lambda: log.exists() and "base complete" in log.read_text(), 120, "the trainer's last line")
    time.sleep(0.05)   # into its exit (50-300 ms after that line gave 143 every time here)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    def finished() -> bool:
        cluster.start_now(job_id)
        return env.state("warned") in ("done", "failed")
    allocs.until(finished, 200, "the job to finish")
    rec, text = env.rec("warned"), log.read_text()
    assert rec.state.value == "done", rec.reason
    assert len(rec.attempts) == 1 and rec.attempts[0].outcome == "completed" and allocs.seen == {job_id}
    if "the trainer exited with code 143" in text:   # (else the signal came before or after the exit)
        assert "requeueing itself" in text and "resumed from step 6 " in text


def test_a_daemon_killed_or_stopped_leaves_its_batch_job_training_and_the_next_one_adopts_it(env, cluster):
    d1 = env.daemon()
    env.drop(slurm_plan("adopted", steps=120, save_every=20, env={"NANOD_FAULT_SLOW_STEP_MS": "150"}))
    allocs = Allocations(cluster, "adopted")
    rec = allocs.until(lambda: (r := env.rec("adopted")) and r.state.value == "running" and r, 60, "it to run")
    job_id, log = slurm_id(rec), env.home / rec.attempts[0].log
    allocs.until(lambda: len(step_lines(log.read_text())) >= 5, 60, "training")
    d1.kill9()
    seen = allocs.until(lambda: (j := json.loads(env.nanod("status", "--json").stdout)["jobs"][0])
                        and j["progress"] and j["progress"]["from_log"] and j, 30, "status to read the log")
    assert not seen["attempt"]["alive"] and seen["slurm"]["job_id"] == job_id and seen["slurm"]["state"] == "RUNNING"
    before = max(step_lines(log.read_text()))
    d2 = env.daemon()
    allocs.until(lambda: any(e["kind"] == "adopted" for e in env.rec("adopted").events), 30, "the adoption")
    allocs.until(lambda: max(step_lines(log.read_text())) > before + 5, 60, "training on under the new daemon")
    assert d2.stop() == 0, "a warm stop leaves the batch job running and exits at once"
    rec = env.rec("adopted")
    assert rec.events[-1]["kind"] == "left_running" and cluster.job(job_id)["JobState"] == "RUNNING"
    env.daemon()
    allocs.until(lambda: env.state("adopted") in ("done", "failed"), 120, "the job to finish")
    rec = env.rec("adopted")
    assert rec.state.value == "done", rec.reason
    assert len(rec.attempts) == 1 and rec.attempts[0].outcome == "completed" and allocs.seen == {job_id}
    assert "run 2 on" not in log.read_text(), "the batch job was never interrupted"


def test_crash_oom_and_stall_on_slurm_follow_the_same_rules_as_on_one_machine(env, cluster):
    """Three jobs at once (two fit on the node; the third pends for Resources): a crash relaunches as a new
    batch job, an OOM halves device_batch_size, a hang is stopped (USR2, then scancel) and relaunched."""
    env.daemon()
    env.drop(slurm_plan("crashes", steps=8, save_every=4, env={"NANOD_FAULT_CRASH_AT_STEP": "5"}))
    env.drop(slurm_plan("ooms", steps=8, save_every=4, env={"NANOD_FAULT_OOM_ABOVE": "2"}))
    env.drop(slurm_plan("hangs", steps=8, save_every=4, env={"NANOD_FAULT_HANG_AT_STEP": "5"},
                        recovery={"stall_timeout": "8s", "kill_grace": "5s"}))
    names = ("crashes", "ooms", "hangs")
    pended = set()

    def all_done() -> bool:
        for n in names:
            r = env.rec(n)
            if r and r.state.value == "waiting" and "(Resources" in r.reason:
                pended.add(n)
        return all(env.state(n) in ("done", "failed") for n in names)
    wait_until(all_done, 300, interval=0.2, message="the three jobs to finish")
    recs = {n: env.rec(n) for n in names}
    for n, r in recs.items():
        assert r.state.value == "done", f"{n}: {r.reason}"
        ids = [a.slurm["job_id"] for a in r.attempts]
        assert len(set(ids)) == len(ids) == 2, f"{n}: one batch job per attempt ({ids})"
    crash = recs["crashes"].attempts[0]
    assert crash.outcome == "crashed" and crash.exit_code == 1 and "injected crash" in crash.error
    assert crash.slurm["state"] == "FAILED"
    assert recs["crashes"].attempts[1].resumed_from == 4
    oom = recs["ooms"]
    assert [a.outcome for a in oom.attempts] == ["oom", "completed"] and oom.device_batch_size["base"] == 2
    hang = recs["hangs"]
    assert [a.outcome for a in hang.attempts] == ["stalled", "completed"]
    kinds = [e["kind"] for e in hang.events]
    assert "stop_stall" in kinds and "killed" in kinds, "SIGTERM through the script, then scancel"
    assert pended, "a third job pends for Resources on a two-core node, and shows it"


def test_cancel_stops_a_running_batch_job_after_its_emergency_checkpoint_and_scancels_a_pending_one(env, cluster):
    d = env.daemon()
    env.drop(slurm_plan("cancelme", steps=200, save_every=50, env={"NANOD_FAULT_SLOW_STEP_MS": "150"}))
    env.drop(slurm_plan("held", steps=8, save_every=4, slurm={"extra_args": ["--hold"]}))
    rec = wait_until(lambda: (r := env.rec("cancelme")) and r.state.value == "running" and r, 60, message="running")
    job_id, log = slurm_id(rec), env.home / rec.attempts[0].log
    wait_until(lambda: len(step_lines(log.read_text())) >= 5, 60, message="training")
    held = wait_until(lambda: (r := env.rec("held")) and r.state.value == "waiting" and "JobHeldUser" in r.reason
                      and r, 30, message="the held job to wait, saying why")
    shown = env.nanod("status").stdout
    assert f"slurm job {slurm_id(held)} PENDING (JobHeldUser)" in shown or "JobHeldUser" in shown
    out = env.nanod("cancel", "cancelme")
    assert out.returncode == 0, out.stderr
    rec = env.wait_state("cancelme", "cancelled", timeout=60)
    text = log.read_text()
    assert "stopped by nanod: SIGTERM to the trainer" in text and "exited with code 4 (stopped: nanod)" in text
    done = max(step_lines(text)) + 1
    assert rec.checkpoint["step"] == done, "the emergency checkpoint is the step it was at"
    assert job_id not in [i for i, _, _ in cluster.jobs()]
    d.stop()
    assert env.state("held") == "waiting" and slurm_id(held) in [i for i, _, _ in cluster.jobs()]
    out = env.nanod("cancel", "held")   # no daemon: the command scancels it itself
    assert out.returncode == 0 and env.state("held") == "cancelled", out.stdout + out.stderr
    assert slurm_id(held) not in [i for i, _, _ in cluster.jobs()]


def test_a_job_sbatch_refuses_fails_with_sbatchs_own_words_and_a_gpu_job_runs_torchrun_inside(env, cluster):
    """This cluster has no GPUs: sbatch refuses gres=gpu:2. The job fails at once, naming sbatch's reason,
    and the script it wrote runs one rank per GPU through torchrun inside the allocation."""
    env.daemon()
    env.drop(slurm_plan("wide", steps=8, save_every=4, slurm={"gres": "gpu:2"}))
    rec = env.wait_state("wide", "failed", timeout=60)
    assert rec.attempts[0].outcome == "failed_to_start" and rec.reason.startswith("base: the trainer could not be "
                                                                                  "started: sbatch: error: ")
    text = (env.home / "slurm" / "wide" / "attempt-001.sh").read_text()
    assert "#SBATCH --gres=gpu:2" in text
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2 --max-restarts=0 -m trainer base" \
        in text and "--resume_from_step=auto" in text
    assert not [j for j in cluster.jobs() if j[1].startswith("wide.a")]
