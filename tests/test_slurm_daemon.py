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
