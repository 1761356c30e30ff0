"""Claims about jobs on several GPUs that need no training: the spec, the locks, torchrun's argv and
report, the nanochat runner's command for two GPUs, and the keeper (real processes, real flocks,
real signals; the "ranks" here are small Python processes in sessions of their own, as torchrun's are).

The same claims with the real trainer under a real daemon are in tests/test_gpus_daemon.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

from conftest import PYTHON, ROOT, wait_until
from daemon import procs
from daemon.config import load_settings
from daemon.gpu import lock as gpulock
from daemon.launchers import attempt_env, torchrun
from daemon.launchers.local import GROUP_ENV, GroupProcess, LocalLauncher
from daemon.spec import JobFileError, JobSpec, parse_job
from daemon.trainers import Outcome
from daemon.trainers.builtin import BuiltinTrainer
from daemon.trainers.nanochat import NanochatTrainer
from nanochat_standin import make_checkout
from trainer import exitcodes

ONE = {"phase": "base", "args": {"depth": 2}}


def spec_of(**top) -> JobSpec:
    return parse_job({**top, "phases": [ONE]}, default_name="wide")


def rec_of(spec: JobSpec, attempts: int = 1):
    return SimpleNamespace(name=spec.name, job_spec=spec, attempts=[None] * attempts)


# ---- the job spec ------------------------------------------------------------------------

def test_gpus_lists_one_rank_per_gpu_and_gpu_stays_the_one_gpu_form():
    assert spec_of(gpus=[2, 0]).gpu_indices == [2, 0] and spec_of(gpus=[2, 0]).world_size == 2
    assert spec_of(gpu=3).gpu_indices == [3] and spec_of().gpu_indices == [0]
    wide = spec_of(gpus=[0, 1])
    assert JobSpec.model_validate(wide.model_dump(mode="json")) == wide, "a recorded spec loads again"


@pytest.mark.parametrize("top, words", [
    ({"gpus": [0, 0]}, "gpus lists GPU 0 twice"),
    ({"gpu": 0, "gpus": [0, 1]}, "either gpu: N (one GPU) or gpus: [..] (several), not both"),
    ({"gpus": []}, "gpus: List should have at least 1 item"),
    ({"gpus": [0, 64]}, "gpus.1"),
    ({"gpus": "0,1"}, "gpus"),
])
def test_bad_gpu_lists_are_refused_naming_the_field(top, words):
    with pytest.raises(JobFileError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.")):
        spec_of(**top)


def test_nanochat_nproc_per_node_defaults_to_the_gpu_count_and_must_match_it(tmp_path):
    runner = {"repo": str(tmp_path)}
    assert spec_of(runner="nanochat", nanochat=runner, gpus=[0, 1]).world_size == 2
    spec_of(runner="nanochat", nanochat={**runner, "nproc_per_node": 2}, gpus=[0, 1])
    with pytest.raises(JobFileError, match="nproc_per_node is 2 but the job has one GPU"):
        spec_of(runner="nanochat", nanochat={**runner, "nproc_per_node": 2})
    with pytest.raises(JobFileError, match="nproc_per_node is 3 but gpus lists 2"):
        spec_of(runner="nanochat", nanochat={**runner, "nproc_per_node": 3}, gpus=[0, 1])


# ---- the locks ------------------------------------------------------------------------------

def test_every_lock_or_none_and_the_first_held_one_is_named(tmp_path):
    paths = [tmp_path / f"gpu{i}.lock" for i in range(3)]
    other = gpulock.try_acquire(paths[1])
    try:
        fds, held = gpulock.try_acquire_all(paths)
        assert fds is None and held == paths[1]
        assert not gpulock.is_held(paths[0]), "the lock taken before the held one is given back"
    finally:
        gpulock.release(other)
    fds, held = gpulock.try_acquire_all(paths)
    assert held is None and all(gpulock.is_held(p) for p in paths)
    gpulock.release_all(fds)
    assert not any(gpulock.is_held(p) for p in paths)


def test_a_job_on_gpus_0_and_1_waits_for_the_holder_of_1_naming_it(nanod_home):
    settings = load_settings(nanod_home)
    path = settings.gpu_lock_path(1)
    fd = gpulock.try_acquire(path)
    gpulock.write_holder(path, pid=os.getpid(), command="somebody's benchmark")
    try:
        why = LocalLauncher(settings).reserve(rec_of(spec_of(gpus=[1, 0])))
        assert why == f"waiting for GPU 1's lock, held by pid {os.getpid()} (somebody's benchmark)"
        assert not gpulock.is_held(settings.gpu_lock_path(0))
    finally:
        gpulock.release(fd)
    fds = LocalLauncher(settings).reserve(rec_of(spec_of(gpus=[1, 0])))
    assert isinstance(fds, list) and len(fds) == 2
    LocalLauncher(settings).release(fds)


def test_exec_takes_several_gpus_and_exec_on_one_of_them_waits(nanod_home):
    settings = load_settings(nanod_home)
    nanod = [PYTHON, "-m", "daemon.cli", "--home", str(nanod_home), "exec"]
    holder = subprocess.Popen(nanod + ["--gpu", "1,0", "--", PYTHON, "-c", "import time; time.sleep(30)"], cwd=ROOT)
    try:
        wait_until(lambda: gpulock.is_held(settings.gpu_lock_path(0)) and gpulock.is_held(settings.gpu_lock_path(1)),
                   20, message="exec to hold GPUs 0 and 1")
        r = subprocess.run(nanod + ["--gpu", "1", "--timeout", "0.3", "--", "true"], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 1 and "waiting for GPU 1's lock, held by pid" in r.stderr
        bad = subprocess.run(nanod + ["--gpu", "0,0", "--", "true"], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and "each GPU index once" in bad.stderr
    finally:
        holder.kill()
        holder.wait()


# ---- torchrun's command and report ---------------------------------------------------------------

def test_the_builtin_trainer_runs_through_torchrun_with_its_restarts_off_on_exactly_the_jobs_gpus(nanod_home):
    settings = load_settings(nanod_home)
    spec = spec_of(gpus=[3, 1])
    launch = BuiltinTrainer(settings).build_launch(spec, 0, args={"depth": 2}, resume_from=None, init_from=None)
    argv = torchrun.wrap(launch.argv, spec.world_size)
    assert argv[:9] == [launch.argv[0], "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                        "--nproc_per_node=2", "--max-restarts=0", "-m", "trainer"]
    assert argv[9:] == launch.argv[3:]
    env = LocalLauncher(settings).place_env(rec_of(spec, attempts=4))
    assert env == {"CUDA_VISIBLE_DEVICES": "3,1", GROUP_ENV: f"{settings.home}/wide/4"}
    assert LocalLauncher(settings).place_env(rec_of(spec_of(gpu=2))) == {"CUDA_VISIBLE_DEVICES": "2"}
    with pytest.raises(ValueError, match="PYTHON -m MODULE"):
        torchrun.wrap(["python", "train.py"], 2)


def test_the_nanochat_runner_for_two_gpus_is_its_checkouts_torchrun_with_both_gpus_visible(tmp_path):
    repo = make_checkout(tmp_path / "nanochat")
    settings = load_settings(home=tmp_path / "home", nanochat_base_dir=tmp_path / "nc", nanochat_repos=[str(repo)])
    spec = parse_job({"name": "nc2", "model_tag": "d4", "runner": "nanochat", "gpus": [0, 1],
                      "nanochat": {"repo": str(repo), "python": ".venv/bin/python"},
                      "phases": [{"phase": "base", "args": {"depth": 4, "num_iterations": 12, "save_every": 4}}]},
                     default_name="nc2")
    adapter = NanochatTrainer(settings).for_job(spec)
    launch = adapter.build_launch(spec, 0, args=dict(spec.phases[0].args), resume_from=8, init_from=None)
    argv = torchrun.wrap(launch.argv, spec.world_size)
    assert argv[:10] == [str(repo / ".venv/bin/python"), "-m", "torch.distributed.run", "--standalone",
                         "--nnodes=1", "--nproc_per_node=2", "--max-restarts=0", "-m", "scripts.base_train",
                         "--depth=4"]
    assert "--resume-from-step=8" in argv and "--model-tag=d4" in argv and launch.cwd == repo
    env = attempt_env(settings, spec, 0, 1, trainer_env=launch.env, defaults=adapter.default_env("base"),
                      place_env=LocalLauncher(settings).place_env(rec_of(spec)))
    assert (env["CUDA_VISIBLE_DEVICES"], env["NANOCHAT_BASE_DIR"], env[GROUP_ENV]) == \
        ("0,1", str(settings.checkpoint_root), f"{settings.home}/nc2/1")
    assert adapter.optim_ranks("base") == 2, "a checkpoint is complete with both ranks' optimizer files"


REPORT = """\
[rank0]: RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1
W1201 20:16:04.286000 12413 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 12457 closing signal SIGTERM
E1201 20:16:04.321000 12413 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: {root}) local_rank: 1
Traceback (most recent call last):
  File "/x/torch/distributed/run.py", line 1032, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
trainer FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-01_20:16:04
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : {other} (pid: 12457){other_sig}
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 12457
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_20:16:04
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {root} (pid: 12458){root_sig}
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def report(root: int, other: int = -15) -> str:
    sig = lambda c: f"  ({signal.Signals(-c).name})" if c < 0 else " "  # noqa: E731
    return REPORT.format(root=root, other=other, root_sig=sig(root), other_sig=sig(other))


@pytest.mark.parametrize("root, other, code", [
    (exitcodes.OOM, -15, exitcodes.OOM),                    # torchrun's own SIGTERM of the peer is not its story
    (1, exitcodes.OOM, exitcodes.OOM),                      # a peer's OOM wins over the crash it caused
    (exitcodes.BAD_ARGS, 1, exitcodes.BAD_ARGS),
    (-9, -15, -9),                                          # a rank killed: a crash
    (exitcodes.INTERRUPTED, -15, exitcodes.INTERRUPTED),    # a stop: every rank saved first
    (exitcodes.INTERRUPTED, 1, 1),
])
def test_a_group_ends_with_its_ranks_telling_exit_code_not_torchruns(root, other, code):
    assert torchrun.rank_returncode(1, report(root, other)) == code
    outcome = BuiltinTrainer(load_settings("/tmp/nanod-unused")).classify_exit(code, torchrun.trainer_output(
        report(root, other)))
    assert outcome == {exitcodes.OOM: Outcome.OOM, exitcodes.BAD_ARGS: Outcome.BAD_ARGS,
                       exitcodes.INTERRUPTED: Outcome.INTERRUPTED}.get(code, Outcome.CRASHED)
    assert torchrun.rank_returncode(0, "") == 0 and torchrun.rank_returncode(-9, "no report") == -9


def test_the_error_of_a_group_is_the_failing_ranks_not_torchruns():
    crash = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x\", line 1\n"
             "[rank1]: RuntimeError: NANOD_FAULT_CRASH_AT_STEP=3: injected crash\n" + report(1, 1))
    assert torchrun.error_line(crash) == "RuntimeError: NANOD_FAULT_CRASH_AT_STEP=3: injected crash"
    assert torchrun.error_line(report(-9)) == "rank 1 was killed by signal 9 (SIGKILL)"
    assert "ChildFailedError" not in torchrun.trainer_output(crash)
    assert "[rank1]:" not in torchrun.trainer_output(crash) and "W1201" not in torchrun.trainer_output(crash)


# ---- the keeper ------------------------------------------------------------------------------------
# A stand-in for torchrun: two "ranks" in sessions of their own, each counting the SIGTERMs it gets
# and exiting 4 after a short "emergency save"; it exits 1 when any rank failed, as torchrun does.
RANK = """
import os, signal, sys, time
terms = 0
def on_term(signum, frame):
    global terms
    terms += 1
    with open(os.environ["MARKS"] + "/" + str(os.getpid()), "a") as f:
        f.write("TERM\\n")
signal.signal(signal.SIGTERM, on_term)
open(os.environ["READY"] + "/" + str(os.getpid()), "w").close()  # the handler is in place
while not terms:
    time.sleep(0.02)
time.sleep(0.3)
sys.exit(4)
"""
AGENT = f"""
import subprocess, sys
ranks = [subprocess.Popen([sys.executable, "-c", {RANK!r}], start_new_session=True) for _ in range(2)]
codes = [r.wait() for r in ranks]
sys.exit(0 if not any(codes) else 1)
"""


@pytest.fixture
def group(tmp_path, nanod_home):
    """A keeper holding GPUs 0 and 1's locks around the stand-in torchrun, as the local launcher starts it."""
    settings = load_settings(nanod_home)
    paths = [settings.gpu_lock_path(i) for i in (0, 1)]
    fds, _ = gpulock.try_acquire_all(paths)
    marks = tmp_path / "marks"
    marks.mkdir()
    ready = tmp_path / "ready"
    ready.mkdir()
    token = f"test-group-{tmp_path}"  # unique: a kill by mark must not reach another run's ranks
    env = {**os.environ, "MARKS": str(marks), "READY": str(ready), GROUP_ENV: token}
    log = open(tmp_path / "keeper.log", "wb")
    popen = subprocess.Popen([PYTHON, "-m", "daemon.launchers.keeper", "--", PYTHON, "-c", AGENT], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT, pass_fds=tuple(fds), start_new_session=True)
    gpulock.release_all(fds)  # from here on only the keeper holds them
    proc = GroupProcess(popen.pid, popen.pid, procs.start_ticks(popen.pid), popen, log=tmp_path / "keeper.log",
                        token=token, nproc=2)
    # both ranks alive and their SIGTERM handlers installed (a rank still starting would die of the signal)
    wait_until(lambda: len(ranks_of(popen.pid)) == 2 and len(list(ready.iterdir())) == 2, 20,
               message="the keeper's torchrun and its two ranks, ready")
    yield SimpleNamespace(proc=proc, paths=paths, marks=marks, agent=agent_of(popen.pid))
    for pid in procs.descendants(popen.pid):
        os.kill(pid, signal.SIGKILL)
    popen.kill()
    popen.wait()
    log.close()


def agent_of(keeper: int) -> int:
    return next(p for p in procs.descendants(keeper) if procs.parent(p) == keeper)


def ranks_of(keeper: int) -> list[int]:
    return [p for p in procs.descendants(keeper) if procs.parent(p) != keeper]


def watch_locks_and_ranks(group, ranks: list[int], until, timeout=20.0) -> None:
    """Poll until `until()`, failing the moment a lock is free while a rank lives."""
    deadline = time.monotonic() + timeout
    while not until():
        alive = [r for r in ranks if procs.is_alive(r)]
        free = [p.name for p in group.paths if not gpulock.is_held(p)]
        assert not (alive and free), f"{free} free while ranks {alive} live"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_keeper_holds_both_locks_until_the_last_rank_is_gone_when_torchrun_is_killed(group):
    ranks = ranks_of(group.proc.pid)
    for r in ranks:
        os.kill(r, signal.SIGSTOP)  # slow to die: the keeper must wait for them, not just for torchrun
    os.kill(group.agent, signal.SIGKILL)
    watch_locks_and_ranks(group, ranks, group.proc.poll)
    assert not any(procs.is_alive(r) for r in ranks), "orphaned ranks are killed, never left to train"
    assert group.proc.keeper_returncode == -signal.SIGKILL, "the keeper reports torchrun's own death"
    assert not any(gpulock.is_held(p) for p in group.paths)


def test_a_stop_reaches_each_rank_once_even_a_stopped_one_and_the_locks_outlive_them(group):
    ranks = ranks_of(group.proc.pid)
    os.kill(ranks[1], signal.SIGSTOP)
    group.proc.terminate()
    watch_locks_and_ranks(group, ranks, group.proc.poll)
    assert sorted(p.read_text() for p in group.marks.iterdir()) == ["TERM\n", "TERM\n"], \
        "one SIGTERM per rank: a second would abort its emergency checkpoint"
    assert group.proc.keeper_returncode == 1 and group.proc.returncode == 1  # no torchrun report: its own code


def test_a_kill_takes_every_rank_and_the_keeper_goes_last(group):
    ranks = ranks_of(group.proc.pid)
    group.proc.kill()
    watch_locks_and_ranks(group, ranks, group.proc.poll)
    assert not any(procs.is_alive(r) for r in ranks + [group.agent])


def test_ranks_whose_keeper_was_sigkilled_are_found_by_their_mark_and_killed(group):
    ranks = ranks_of(group.proc.pid)
    os.kill(ranks[0], signal.SIGSTOP)
    os.kill(group.proc.pid, signal.SIGKILL)   # torchrun dies with it (its death signal); the ranks do not
    wait_until(group.proc.poll, 10, message="the keeper's end")
    wait_until(lambda: not any(procs.is_alive(r) for r in ranks), 10, message="the marked ranks to be killed")


def test_health_sums_the_rss_of_the_whole_group_and_reads_vram_per_gpu_of_the_job(group, nanod_home):
    from daemon import health
    from daemon.atomic import write_json_atomic
    from daemon.queue import Attempt, JobRecord, JobState
    settings = load_settings(nanod_home)
    keeper = group.proc.pid
    rec = JobRecord(name="wide", seq=1, spec={"name": "wide", "gpus": [1, 0], "phases": [ONE]},
                    state=JobState.RUNNING, progress={"phase": "base", "step": 3},
                    attempts=[Attempt(n=1, phase="base", pid=keeper, pgid=keeper, proc_start=group.proc.proc_start)])
    (settings.state_dir / "jobs").mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings.state_dir / "jobs" / "wide.json", rec.to_dict())
    t = health.read_trainer(settings)
    members = [keeper, group.agent, *ranks_of(keeper)]
    assert t["gpus"] == [1, 0] and t["processes"] == 4, "the keeper, torchrun and both ranks, in three sessions"
    assert t["rss_bytes"] >= sum(procs.rss(p) for p in members) * 0.9
    reading = {"gpus": [{"index": i, "used_bytes": 100 + i, "total_bytes": 1000} for i in range(3)]}
    assert health.job_vram(t["gpus"], reading) == [{"index": 1, "used_bytes": 101, "total_bytes": 1000},
                                                   {"index": 0, "used_bytes": 100, "total_bytes": 1000}]
