"""End-to-end claims about the daemon: a real `nanod run`, the real trainer on tiny CPU plans, real signals.

Each test gets its own home, lock directory and NANOCHAT_BASE_DIR (conftest's
fixtures). The helpers here are shared with tests/test_daemon_recovery.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from daemon import queue as q
from daemon.atomic import read_json
from daemon.config import load_settings
from daemon.gpu import lock as gpulock
from tests.conftest import PYTHON, ROOT, wait_until
from trainer import layout

pytestmark = pytest.mark.slow

TINY = {"depth": 2, "max_seq_len": 32, "device_batch_size": 4, "total_batch_size": 128}


def plan(name: str, *, steps: int = 8, save_every: int = 4, phases=("base",), env=None, recovery=None,
         base_args=None) -> dict:
    """A tiny job: depth 2, 32-token rows, `steps` base steps; mid/sft get 4 steps."""
    out = {"name": name, "model_tag": name, "env": env or {},
           "recovery": {"max_restarts_without_progress": 2, "stall_timeout": "20s", "startup_grace": "90s",
                        "kill_grace": "20s", **(recovery or {})},
           "phases": []}
    for ph in phases:
        if ph == "base":
            args = {**TINY, "num_iterations": steps, "save_every": save_every, **(base_args or {})}
        elif ph == "mid":
            args = {"max_seq_len": 32, "device_batch_size": 4, "total_batch_size": 128, "num_iterations": 4, "save_every": 2}
        else:
            args = {"max_tokens": 32, "device_batch_size": 4, "total_batch_size": 128, "num_iterations": 4, "save_every": 2}
        out["phases"].append({"phase": ph, "args": args})
    return out


class Daemon:
    """One `nanod run` process on a home, its output in <tmp>/daemon-N.log."""

    count = 0

    def __init__(self, home: Path):
        Daemon.count += 1
        self.home = home
        self.log = home.parent / f"daemon-{Daemon.count}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Daemon":
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([PYTHON, "-m", "daemon.cli", "--home", str(self.home), "run"],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            wait_until(self.up, 20, message=f"the daemon to start ({self.output()})")
        return self

    def up(self) -> bool:
        info = read_json(self.home / "state" / "daemon.json")
        return bool(info and info.get("pid") == self.proc.pid and "stopped_at" not in info)

    def output(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def env(nanod_home, nanochat_dir, tmp_path):
    """A home, a checkpoint root and a way to start daemons; every trainer left is killed at the end."""
    settings = load_settings(nanod_home)
    daemons: list[Daemon] = []

    class Env:
        home = nanod_home
        root = nanochat_dir

        @staticmethod
        def daemon(start=True) -> Daemon:
            d = Daemon(nanod_home)
            daemons.append(d)
            return d.start() if start else d

        @staticmethod
        def drop(job: dict, filename: str | None = None) -> Path:
            """Write a plan into the inbox the way an editor's save-then-rename does."""
            inbox = settings.inbox_dir
            inbox.mkdir(parents=True, exist_ok=True, mode=0o700)
            dest = inbox / (filename or f"{job['name']}.yaml")
            tmp = inbox / f".{dest.name}.tmp"
            tmp.write_text(yaml.safe_dump(job))
            os.replace(tmp, dest)
            return dest

        @staticmethod
        def rec(name: str):
            return q.load_job(settings, name)

        @staticmethod
        def state(name: str) -> str | None:
            r = q.load_job(settings, name)
            return r.state.value if r else None

        @staticmethod
        def wait_state(name: str, *states: str, timeout: float = 120) -> q.JobRecord:
            wait_until(lambda: Env.state(name) in states, timeout,
                       message=f"{name} to be {'/'.join(states)} (now {Env.state(name)}; "
                               f"{(Env.rec(name) or {}) and Env.rec(name).reason}) {daemons[-1].output() if daemons else ''}")
            return Env.rec(name)

        @staticmethod
        def ckpt_dir(name: str, phase: str = "base") -> Path:
            return layout.checkpoint_dir(nanochat_dir, phase, name)

        @staticmethod
        def nanod(*args, timeout=60) -> subprocess.CompletedProcess:
            return subprocess.run([PYTHON, "-m", "daemon.cli", "--home", str(nanod_home), *args],
                                  capture_output=True, text=True, timeout=timeout, cwd=ROOT)

        settings_ = settings

    yield Env
    for d in daemons:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
    for pid in trainer_pids(nanochat_dir):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def trainer_pids(root: Path) -> list[int]:
    """Live trainer processes that write under `root` (found by their environment)."""
    out = []
    needle = f"NANOCHAT_BASE_DIR={root}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"trainer" not in cmd:
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
            if needle + b"\0" in Path(f"/proc/{entry}/environ").read_bytes() + b"\0":
                out.append(int(entry))
        except (OSError, ValueError):
            continue
    return out


def outcomes(rec) -> list[str | None]:
    return [a.outcome for a in rec.attempts]


# ---- the claims ----------------------------------------------------------------------------
def test_a_dropped_plan_runs_base_then_mid_then_sft_to_done(env):
    d = env.daemon()
    env.drop(plan("plan3", steps=8, phases=("base", "mid", "sft")))
    rec = env.wait_state("plan3", "done", timeout=150)
    assert rec.phase_final_steps == {"base": 8, "mid": 4, "sft": 4}
    assert [(a.phase, a.outcome) for a in rec.attempts] == [("base", "completed"), ("mid", "completed"),
                                                            ("sft", "completed")]
    assert [a.init_from for a in rec.attempts] == [None, 8, 4]  # each phase from the previous final step
    assert layout.is_complete(env.ckpt_dir("plan3", "sft"), 4)
    assert (env.settings_.state_dir / "accepted" / "plan3.yaml").exists()
    assert "plan3" in env.nanod("list").stdout
    assert rec.progress["phase"] == "sft" and rec.progress["losses"]
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "libtorch" not in maps, "the daemon never imports torch, not even indirectly"


def test_oom_halves_the_batch_down_to_what_fits_keeping_the_total_batch_and_later_phases_start_there(env):
    env.daemon()
    job = plan("oom", steps=4, phases=("base", "mid"), env={"NANOD_FAULT_OOM_ABOVE": "2"},
               base_args={"device_batch_size": 8, "total_batch_size": 256})
    job["phases"][1]["args"].update(device_batch_size=8, total_batch_size=256)
    env.drop(job)
    rec = env.wait_state("oom", "done", "failed", timeout=150)
    assert rec.state.value == "done", rec.reason
    assert [(a.phase, a.device_batch_size, a.outcome) for a in rec.attempts] == [
        ("base", 8, "oom"), ("base", 4, "oom"), ("base", 2, "completed"), ("mid", 2, "completed")]
    assert rec.device_batch_size == {"base": 2, "mid": 2}
    for phase, step in (("base", 4), ("mid", 4)):
        meta = layout.read_meta(env.ckpt_dir("oom", phase), step)
        assert (meta["total_batch_size"], meta["device_batch_size"]) == (256, 2)
    assert sum(e["kind"] == "oom_backoff" for e in rec.events) == 2


def test_a_crash_at_the_same_step_every_time_fails_after_the_budget_with_its_error(env):
    env.daemon()
    env.drop(plan("crashy", steps=12, save_every=2, recovery={"max_restarts_without_progress": 1},
                  env={"NANOD_FAULT_CRASH_AT_STEP": "3", "NANOD_FAULT_REPEAT": "1"}))
    rec = env.wait_state("crashy", "failed", "done", timeout=150)
    assert rec.state.value == "failed"
    # attempt 1 saved step 2 (progress: relaunch), attempt 2 none (1/1), attempt 3 none: over budget
    assert outcomes(rec) == ["crashed", "crashed", "crashed"]
    assert "NANOD_FAULT_CRASH_AT_STEP=3" in rec.reason and "giving up" in rec.reason
    assert [a.resumed_from for a in rec.attempts] == [None, 2, 2]


def test_a_failed_job_does_not_block_the_next_and_cancel_and_retry_work(env):
    env.daemon()
    bad = plan("bad", steps=4)
    bad["phases"][0]["args"]["no_such_flag"] = 1
    env.drop(bad)
    env.drop(plan("long", steps=400, save_every=5))
    rec = env.wait_state("bad", "failed")
    # refused by the preflight check, or by the trainer itself (exit 2): failed at once, not retried
    assert "no_such_flag" in rec.reason and outcomes(rec) in ([], ["bad_args"])
    wait_until(lambda: layout.latest_complete(env.ckpt_dir("long")), 120, message="a checkpoint of long")
    r = env.nanod("cancel", "long")
    assert r.returncode == 0, r.stderr
    rec = env.wait_state("long", "cancelled", timeout=60)
    assert outcomes(rec) == ["cancelled"]
    stopped_at = layout.latest_complete(env.ckpt_dir("long"))
    assert env.nanod("cancel", "long").returncode == 2  # already cancelled: a one-line user error
    assert env.nanod("retry", "long").returncode == 0
    rec = env.wait_state("long", "running", "done", timeout=60)
    wait_until(lambda: env.rec("long").last_attempt.pid, 30)
    assert env.rec("long").last_attempt.resumed_from == stopped_at
    env.nanod("cancel", "long")
    env.wait_state("long", "cancelled", timeout=60)


def test_a_new_job_refuses_a_checkpoint_folder_holding_another_runs_checkpoints(env):
    d = env.ckpt_dir("reused")
    d.mkdir(parents=True)
    for path in (layout.model_path(d, 250), layout.optim_path(d, 250, 0)):
        path.write_bytes(b"weights of an earlier run")
    layout.meta_path(d, 250).write_text('{"step": 250}')
    env.daemon()
    env.drop(plan("reused", steps=4))
    rec = env.wait_state("reused", "failed", timeout=30)
    assert "already holds checkpoints of another run (steps 250-250)" in rec.reason and "model_tag" in rec.reason
    assert rec.attempts == [] and layout.list_steps(d) == [250], "nothing launched, nothing deleted"


def test_another_holder_of_the_gpu_lock_makes_the_job_wait_naming_it(env, tmp_path):
    lock_path = env.settings_.gpu_lock_path(0)
    fd = gpulock.try_acquire(lock_path)
    gpulock.write_holder(lock_path, pid=os.getpid(), command="somebody else's benchmark")
    try:
        env.daemon()
        env.drop(plan("polite", steps=4))
        rec = env.wait_state("polite", "waiting", timeout=30)
        assert f"pid {os.getpid()}" in rec.reason and "somebody else's benchmark" in rec.reason
        time.sleep(1.0)  # a real wait: it stays waiting while the lock is held
        assert env.state("polite") == "waiting" and not trainer_pids(env.root)
    finally:
        gpulock.release(fd)
    env.wait_state("polite", "done", timeout=120)


def test_a_job_file_still_in_the_inbox_after_a_daemon_death_is_the_same_job_not_a_duplicate(env):
    lock_path = env.settings_.gpu_lock_path(0)
    fd = gpulock.try_acquire(lock_path)  # keep the job waiting, so the test is about the inbox alone
    try:
        d = env.daemon()
        job = plan("twice", steps=4)
        env.drop(job)
        env.wait_state("twice", "waiting", timeout=30)
        d.kill9()
        # what a daemon killed between queueing the file and moving it out of the inbox leaves
        dropped = env.drop(job)
        other = env.drop({**plan("twice", steps=8)}, filename="twice-again.yaml")
        env.daemon()
        wait_until(lambda: not dropped.exists(), 30, message="the job's own file taken out of the inbox")
        assert not Path(str(dropped) + ".rejected").exists()
        wait_until(lambda: Path(str(other) + ".rejected").exists(), 30, message="a different file of that name rejected")
        assert env.state("twice") == "waiting" and len(env.rec("twice").attempts) == 0
    finally:
        gpulock.release(fd)
    env.wait_state("twice", "done", timeout=120)


def test_a_second_daemon_on_the_same_home_refuses_and_one_on_another_home_runs(env, tmp_path):
    first = env.daemon()
    r = env.nanod("run", timeout=30)
    assert r.returncode == 2
    assert f"pid {first.proc.pid}" in r.stderr and "already running" in r.stderr and len(r.stderr.splitlines()) == 1
    other = Daemon(tmp_path / "other-home").start()
    try:
        assert other.up() and first.up()
    finally:
        assert other.stop() == 0
    assert first.stop() == 0


def test_auto_batch_is_chosen_once_recorded_shown_and_given_to_later_attempts_and_same_shape_phases(env):
    env.daemon()
    # 256 tokens of 32-token rows: the candidates are 1, 2, 4, 8; the simulated card fits 2.
    # The first attempt crashes before step 3 (after its checkpoint at 2): the relaunch resumes.
    job = plan("auto", steps=4, save_every=2, phases=("base", "mid"),
               env={"NANOD_FAULT_OOM_ABOVE": "2", "NANOD_FAULT_CRASH_AT_STEP": "3"},
               base_args={"device_batch_size": "auto", "total_batch_size": 256})
    job["phases"][1]["args"].update(device_batch_size="auto", total_batch_size=256)
    env.drop(job)
    rec = env.wait_state("auto", "done", "failed", timeout=150)
    assert rec.state.value == "done", rec.reason
    assert [(a.phase, a.device_batch_size, a.outcome) for a in rec.attempts] == [
        ("base", 2, "crashed"), ("base", 2, "completed"), ("mid", 2, "completed")]
    assert rec.device_batch_size == {"base": 2, "mid": 2}
    logs = [(env.home / a.log).read_text() for a in rec.attempts]
    assert "--device_batch_size=auto" in logs[0] and "auto-fit: device_batch_size 2 (probed 4 no, 2 yes" in logs[0]
    for later in logs[1:]:   # given, not probed again: the relaunch, and mid (same model, rows and GPUs)
        assert "--device_batch_size=2" in later and "auto-fit:" not in later
    fits = [e["message"] for e in rec.events if e["kind"] == "autofit"]
    assert fits[0].startswith("base: auto-fit: device_batch_size 2 (probed") and \
        fits[1] == "mid: device_batch_size 2 from base's auto-fit (same model, row length and GPUs: not probed again)"
    for phase in ("base", "mid"):
        meta = layout.read_meta(env.ckpt_dir("auto", phase), 4)
        assert (meta["total_batch_size"], meta["device_batch_size"], meta["grad_accum_steps"]) == (256, 2, 4)
    # the relaunch was given 2 and resumed: the final checkpoint still says what auto-fit probed
    assert layout.read_meta(env.ckpt_dir("auto"), 4)["nanod"]["autofit"]["probes"] == [[4, False, None], [2, True, None]]
    status = json.loads(env.nanod("status", "--json").stdout)
    job_view = next(j for j in status["jobs"] if j["name"] == "auto")
    assert (job_view["device_batch_size"], job_view["device_batch_size_auto"]) == (2, True)
