"""Claims about SLURM jobs that need no cluster: the slurm: block, the batch script (run by bash with a real
trainer stand-in and real signals), reading scontrol, job names, the environment a batch job gets.

The end-to-end claims against a real one-node cluster are in tests/test_slurm_daemon.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from daemon.launchers import launcher_for
from daemon.launchers.slurm import JobInfo, SlurmJob, SlurmLauncher, clean_env, job_name, ours
from daemon.launchers.slurm_script import render_script, sbatch_options
from daemon.spec import JobFileError, parse_job_bytes
from daemon.spec_slurm import REFUSED, gres_gpus, parse_time
from daemon.trainers import Outcome
from tests.conftest import wait_until

BASE = "phases: [{phase: base, args: {depth: 2, num_iterations: 8}}]\n"


def job(slurm: str, extra: str = ""):
    return parse_job_bytes(f"slurm: {slurm}\n{extra}{BASE}".encode(), filename="j.yaml")


def refused(slurm: str, extra: str = "") -> str:
    with pytest.raises(JobFileError) as e:
        job(slurm, extra)
    return str(e.value)


# ---- the slurm: block ----------------------------------------------------------------------
def test_a_slurm_block_gives_ranks_from_its_gpus_and_takes_no_gpu_of_this_machine():
    spec = job("{partition: gpu, time: '24:00:00', gres: 'gpu:a100:4', mem: 64G, cpus_per_task: 16}")
    assert spec.world_size == 4 and spec.gpu_indices == []
    assert job("{gpus_per_node: 2}").world_size == 2 and job("{}").world_size == 1
    assert launcher_for(None, spec).name == "slurm"
    assert launcher_for(None, parse_job_bytes(BASE.encode(), filename="j.yaml")).name == "local"


@pytest.mark.parametrize("arg", ["--wrap=hostname", "--array=1-4", "-a", "--output=x.log", "-o", "--error=e.log",
                                 "--open-mode=truncate", "--requeue", "--no-requeue", "--signal=B:USR1@60",
                                 "--job-name=x", "-J", "--export=NONE", "--chdir=/tmp", "--nodes=2", "--time=10",
                                 "--partition=x", "--wait", "--gpus=2"])
def test_extra_args_that_cannot_work_with_nanods_script_are_refused_each_by_name(arg):
    why = refused(f"{{extra_args: ['{arg}']}}")
    assert f"extra_args[0] '{arg}' is refused: " in why
    long = arg.split("=")[0]
    from daemon.spec_slurm import SHORT
    assert REFUSED[SHORT.get(long, long)] in why


@pytest.mark.parametrize("slurm, says", [
    ("{time: 24:00:00}", 'slurm.time: must be a quoted string such as "24:00:00"'),
    ("{time: 'tomorrow'}", "is not a SLURM time"),
    ("{time: '1', checkpoint_grace: 2m}", "checkpoint_grace (120s) must be shorter than time (1)"),
    ("{checkpoint_grace: 5s}", "checkpoint_grace must be at least 10s"),
    ("{gres: 'gpu:2', gpus_per_node: 2}", "give either gres or gpus_per_node, not both"),
    ("{gres: 'gpu::2'}", "is not a gres"),
    ("{mem: lots}", "is not a SLURM memory size"),
    ("{partition: 'a b'}", "must be one word"),
    ("{extra_args: ['--exclusive', 'foo']}", "extra_args[1] 'foo' is not an option"),
    ("{extra_args: ['--comment=a b']}", "one word, without spaces"),
    ("{partiton: gpu}", "slurm.partiton: unknown key"),
    ("{cpus_per_task: '8'}", "slurm.cpus_per_task"),
])
def test_a_bad_slurm_block_is_refused_naming_the_field(slurm, says):
    assert says in refused(slurm)


def test_a_slurm_job_names_no_local_gpu_and_no_nanochat_runner_yet():
    assert "drop gpu:/gpus:" in refused("{}", "gpus: [0, 1]\n")
    assert "drop gpu:/gpus:" in refused("{}", "gpu: 1\n")
    why = refused("{}", "runner: nanochat\nnanochat: {repo: /x}\n")
    assert "runner: nanochat cannot run on SLURM yet" in why


def test_slurm_times_and_gres_read_as_slurm_reads_them():
    assert [parse_time(t) for t in ("30", "5:30", "1:00:00", "2-0", "1-2:30", "1-00:00:01")] == \
        [1800, 330, 3600, 172800, 95400, 86401]
    assert [gres_gpus(g) for g in ("gpu", "gpu:4", "gpu:a100:2", "gpu:2,nvme:1", "nvme:1")] == [1, 4, 2, 2, 0]


# ---- reading SLURM ----------------------------------------------------------------------------
SCONTROL = ("JobId=42 JobName=tiny.a3.nanodabc123 UserId=alice(1000) GroupId=alice(1000) MCS_label=N/A "
            "Priority=4294901759 Nice=0 Account=(null) QOS=(null) JobState=PENDING Reason=BeginTime "
            "Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 Reboot=0 ExitCode=0:15 RunTime=00:00:00 "
            "TimeLimit=UNLIMITED NodeList=(null) BatchHost=node7 Command=/home/a b/x.sh WorkDir=/home/a b")


def test_scontrol_show_job_is_read_for_state_reason_restarts_node_and_exit_code():
    info = JobInfo.parse(SCONTROL)
    assert (info.job_id, info.name, info.state, info.reason, info.restarts, info.node, info.exit_code) == \
        ("42", "tiny.a3.nanodabc123", "PENDING", "BeginTime", 1, "node7", -15)
    assert JobInfo.parse(SCONTROL.replace("ExitCode=0:15", "ExitCode=3:0")).exit_code == 3
    assert JobInfo.parse("") is None


def test_a_batch_job_name_says_the_job_and_attempt_of_this_home_only(tmp_path):
    from daemon.config import load_settings
    here, other = load_settings(tmp_path / "a"), load_settings(tmp_path / "b")
    name = job_name(here, "tiny.v2", 7)
    assert name.startswith("tiny.v2.a7.nanod") and ours(here, "tiny.v2", name) == 7
    assert ours(other, "tiny.v2", name) is None, "another home's job of the same name is not ours"
    assert ours(here, "tiny", name) is None and ours(here, "v2", name) is None
    assert ours(here, "tiny.v2", "tiny.v2.a7") is None


def test_a_batch_job_gets_the_attempts_environment_less_slurms_sbatchs_and_this_machines_gpus():
    env = clean_env({"PATH": "/bin", "SLURM_CONF": "/etc/slurm.conf", "SLURM_JOB_ID": "9", "SBATCH_PARTITION": "x",
                     "CUDA_VISIBLE_DEVICES": "0", "NANOD_ATTEMPT": "2", "SRUN_CPUS_PER_TASK": "4"})
    assert env == {"PATH": "/bin", "SLURM_CONF": "/etc/slurm.conf", "NANOD_ATTEMPT": "2"}


def ended(tmp_path, state: str, log_text: str, exit_code: str = "0:0") -> SlurmJob:
    log = tmp_path / "attempt.log"
    log.write_text(log_text)
    j = SlurmJob("42", name="x", log=log, poll_interval=1.0)
    j._end(JobInfo.parse(SCONTROL.replace("JobState=PENDING", f"JobState={state}")
                         .replace("ExitCode=0:15", f"ExitCode={exit_code}")))
    return j


def test_the_trainers_exit_code_comes_from_the_scripts_last_word_and_the_state_says_the_rest(tmp_path):
    mark = "# nanod: slurm job 42 the trainer exited with code {}\n"
    assert ended(tmp_path, "FAILED", "step 1\n" + mark.format(3), "3:0").returncode == 3
    j = ended(tmp_path, "TIMEOUT", mark.format(143), "0:9")
    assert j.returncode == 143 and j.ended_by[0] == Outcome.INTERRUPTED and "time limit" in j.ended_by[1]
    j = ended(tmp_path, "TIMEOUT", "", "0:9")
    assert j.returncode == -9, "no word from the script: SLURM's ExitCode (the signal)"
    assert ended(tmp_path, "CANCELLED", mark.format(4)).ended_by[0] == Outcome.CANCELLED
    assert ended(tmp_path, "NODE_FAIL", "").ended_by[0] == Outcome.CRASHED
    assert ended(tmp_path, "COMPLETED", mark.format(0)).ended_by is None


def test_a_pending_or_requeued_batch_job_is_waiting_and_a_running_one_is_not(tmp_path):
    j = SlurmJob("42", name="x", log=tmp_path / "l", poll_interval=1.0, restarts=0)
    assert j.waiting == "SLURM job 42 submitted"
    j._see(JobInfo.parse(SCONTROL.replace("Restarts=1", "Restarts=0").replace("PENDING", "RUNNING")))
    assert j.waiting is None and j.running_on() == "SLURM job 42 running on node7"
    j._see(JobInfo.parse(SCONTROL.replace("JobState=PENDING", "JobState=COMPLETING")))
    assert j.waiting == "SLURM job 42 being requeued, requeued 1x"
    assert [k for k, _ in j.take_events()] == ["slurm_requeue"]
    j._see(JobInfo.parse(SCONTROL))
    assert j.waiting == "SLURM job 42 pending (BeginTime, requeued 1x)"


# ---- the batch script, run by bash with real signals ---------------------------------------
STANDIN = textwrap.dedent("""\
    import os, signal, sys, time
    got = []
    def on_term(s, f):
        got.append(s)
        print(f"standin got SIGTERM {len(got)}", flush=True)
    signal.signal(signal.SIGTERM, on_term)
    print("standin up", os.getpid(), flush=True)
    while not got:
        time.sleep(0.05)
    time.sleep(0.5)   # the emergency checkpoint: any second SIGTERM would arrive meanwhile
    print(f"standin saved after {len(got)} SIGTERM", flush=True)
    sys.exit(4)
""")


def run_script(tmp_path, standin_text: str = STANDIN):
    standin = tmp_path / "standin.py"
    standin.write_text(standin_text)
    spec = job("{time: '10', checkpoint_grace: 60s, extra_args: ['--exclusive']}")
    opts = sbatch_options(spec.slurm, job_name="j.a1.nanodx", log=tmp_path / "log", workdir=tmp_path)
    script = tmp_path / "job.sh"
    script.write_text(render_script([sys.executable, str(standin)], opts, title="test"))
    out = open(tmp_path / "out.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    proc = subprocess.Popen(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT,
                            env={**env, "SLURM_JOB_ID": "77"}, start_new_session=True)
    out.close()
    wait_until(lambda: "standin up" in (tmp_path / "out.log").read_text(), 30, message="the stand-in to start")
    pid = int((tmp_path / "out.log").read_text().split("standin up ")[1].split()[0])
    return script, proc, pid


def test_the_script_has_every_sbatch_option_as_a_line_and_is_valid_bash(tmp_path):
    script, proc, _ = run_script(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    text = script.read_text()
    head = [ln for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    assert head[:5] == ["#SBATCH --job-name=j.a1.nanodx", f"#SBATCH --output={tmp_path / 'log'}",
                        "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@60"]
    assert "#SBATCH --time=10" in head and head[-1] == "#SBATCH --exclusive"
    first_code = next(i for i, ln in enumerate(text.splitlines()) if ln and not ln.startswith("#"))
    assert all(i < first_code for i, ln in enumerate(text.splitlines()) if ln.startswith("#SBATCH")), \
        "sbatch reads #SBATCH lines only before the first command"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_nanods_stop_reaches_the_trainer_as_exactly_one_sigterm_and_the_script_exits_with_its_code(tmp_path):
    _, proc, _ = run_script(tmp_path)
    for _ in range(3):   # nanod may ask again: the trainer still gets one SIGTERM
        os.kill(proc.pid, signal.SIGUSR2)
    assert proc.wait(30) == 4
    out = (tmp_path / "out.log").read_text()
    assert "standin saved after 1 SIGTERM" in out and "standin got SIGTERM 2" not in out
    assert "# nanod: slurm job 77 the trainer exited with code 4 (stopped: nanod)" in out


def test_when_slurm_terminates_the_whole_job_the_script_forwards_nothing(tmp_path):
    """SLURM's requeue, pre-emption or scancel sends SIGTERM to every process: a second one from the script
    would abort the trainer's emergency checkpoint."""
    _, proc, trainer = run_script(tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(trainer, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGUSR1)   # even a time-limit warning that comes meanwhile
    assert proc.wait(30) == 4
    out = (tmp_path / "out.log").read_text()
    assert "standin saved after 1 SIGTERM" in out and "standin got SIGTERM 2" not in out
    assert "(stopped: slurm)" in out and "requeueing itself" not in out


def test_at_the_time_limit_warning_the_trainer_saves_then_the_script_requeues_its_job(tmp_path):
    """USR1 (--signal=B:USR1@grace): one SIGTERM on, and after the emergency checkpoint `scontrol requeue`
    of its own job; here no SLURM answers, so it says so and exits with the trainer's code for nanod."""
    _, proc, _ = run_script(tmp_path)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(60) == 4
    out = (tmp_path / "out.log").read_text()
    assert "time limit near: SIGTERM to the trainer" in out and "standin saved after 1 SIGTERM" in out
    assert "requeueing itself" in out and "scontrol requeue failed: nanod relaunches the attempt" in out


def test_a_time_limit_warning_that_lands_as_the_trainer_exits_is_never_taken_for_a_crash(tmp_path):
    """USR1 and the trainer's exit reach bash together: its `wait` returns 138 for the trap, and bash may
    lose the trainer's status in that race. The script then says the trainer's own 0, or requeues (the next
    run resumes from the newest checkpoint); never a 138 left for nanod to read as a crash. A race: run
    30 times (the code before this fix lost it in about a quarter of them)."""
    script = tmp_path / "race.sh"
    script.write_text(render_script(["bash", "-c", 'trap "" TERM; kill -USR1 $PPID; exit 0'], [], title="race"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM")}, "SLURM_JOB_ID": "77"}
    seen = set()
    for _ in range(30):
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
        said = r.stdout.split("the trainer exited with code ")[1].split()[0]
        requeued = "requeueing itself" in r.stdout and "scontrol requeue failed" in r.stdout
        assert (said, r.returncode, requeued) in (("0", 0, False), ("138", 138, True)), r.stdout
        seen.add(said)
    assert "0" in seen


def test_a_trainer_killed_by_the_time_limit_sigterm_itself_is_requeued_not_crashed(tmp_path):
    """The warning's SIGTERM came before the trainer's handler was in place, or as it exited (Python puts
    SIGTERM back to the default at exit): 143, and the script requeues; the next run resumes from the
    newest checkpoint. Here no SLURM answers the requeue, so the script says so and exits 143 for nanod."""
    bare = 'import os, time\nprint("standin up", os.getpid(), flush=True)\ntime.sleep(60)\n'
    _, proc, _ = run_script(tmp_path, bare)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(30) == 143
    out = (tmp_path / "out.log").read_text()
    assert "the trainer exited with code 143 (stopped: time_limit)" in out
    assert "requeueing itself" in out and "scontrol requeue failed: nanod relaunches the attempt" in out


def test_a_trainer_killed_by_slurms_own_sigterm_after_the_warning_is_not_requeued_by_the_script(tmp_path):
    """SLURM's kill at the time limit (its SIGTERM to every process) after the warning's, and the trainer
    exits 143 of it (a second signal: now, unsaved): the run lost its race with the limit; that TIMEOUT is
    the daemon's to read, not the script's to requeue."""
    second_kills = textwrap.dedent("""\
        import os, signal, time
        def on_term(s, f):
            print("standin got SIGTERM 1", flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)   # as the trainer's: a second one ends it unsaved
        signal.signal(signal.SIGTERM, on_term)
        print("standin up", os.getpid(), flush=True)
        while True:
            time.sleep(0.05)
    """)
    _, proc, trainer = run_script(tmp_path, second_kills)
    os.kill(proc.pid, signal.SIGUSR1)
    wait_until(lambda: "standin got SIGTERM 1" in (tmp_path / "out.log").read_text(), 10, message="the warning")
    os.kill(proc.pid, signal.SIGTERM)   # SLURM ends the job: every process, the trainer too
    os.kill(trainer, signal.SIGTERM)
    assert proc.wait(30) == 143
    out = (tmp_path / "out.log").read_text()
    assert "the trainer exited with code 143 (stopped: time_limit)" in out and "requeueing itself" not in out


def test_a_slurm_launcher_waits_for_slurm_when_squeue_cannot_answer(tmp_path, monkeypatch):
    from daemon.config import load_settings
    from daemon.queue import JobRecord
    monkeypatch.setenv("PATH", str(tmp_path))   # no squeue on PATH at all
    settings = load_settings(tmp_path / "home")
    spec = job("{}")
    rec = JobRecord(name=spec.name, seq=1, spec=spec.model_dump(mode="json"))
    why = SlurmLauncher(settings).reserve(rec)
    assert why == "waiting for SLURM to answer: squeue: not found (is the SLURM client installed, and on PATH?)"


def test_preflight_does_not_judge_a_slurm_jobs_vram_by_this_machines_gpus(tmp_path):
    from daemon.config import load_settings
    from daemon.gpu.vram import GpuInfo, GpuReading
    from daemon.preflight import check_phase
    settings = load_settings(tmp_path / "home", nanochat_base_dir=tmp_path / "ckpt")
    checks = check_phase(settings, job("{gres: 'gpu:1'}"), 0, gpus=GpuReading("nvml", [GpuInfo(0, "small", 1, 1, 0)]))
    vram = next(c for c in checks if c.name == "base vram")
    assert vram.level == "OK" and "on SLURM (the default partition, gpu:1): not checked here" in vram.message


def test_the_shipped_slurm_plan_runs_four_ranks_on_its_allocation_and_checkpoints_before_its_time_limit():
    from daemon.spec import load_job_file
    from tests.conftest import ROOT
    spec = load_job_file(ROOT / "jobs" / "examples" / "slurm-4xa100.yaml")
    assert spec.world_size == 4 and spec.gpu_indices == [] and spec.slurm.time == "24:00:00"
    assert spec.slurm.checkpoint_grace >= spec.recovery.kill_grace, "the time-limit stop gets the grace a stop gets"


def test_a_fault_fires_on_the_first_run_of_a_batch_job_only_and_a_requeued_run_is_not_a_first_attempt():
    from trainer.faults import Faults
    env = {"NANOD_FAULT_HANG_AT_STEP": "13", "NANOD_ATTEMPT": "1", "NANOD_FAULT_SLOW_STEP_MS": "150"}
    assert Faults.from_env({**env, "SLURM_RESTART_COUNT": "0"}).hang_at == 13
    requeued = Faults.from_env({**env, "SLURM_RESTART_COUNT": "1"})
    assert requeued.hang_at is None and requeued.slow_step_ms == 150
    assert Faults.from_env({**env, "SLURM_RESTART_COUNT": "2", "NANOD_FAULT_REPEAT": "1"}).hang_at == 13
