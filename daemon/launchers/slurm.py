"""Launcher `slurm`: each attempt is one batch job on a SLURM cluster, followed from the login node.

The daemon runs where `sbatch` works. For an attempt it writes the batch script
(daemon/launchers/slurm_script.py) to `<home>/slurm/<job>/attempt-NNN.sh`
(0600), creates the attempt's log and submits with `sbatch --parsable`. The log
and the checkpoints live on the shared filesystem, so the daemon reads step
lines and finds new checkpoints exactly as for a local attempt.

Following a job: `scontrol show job -o ID` every `slurm_poll_interval`
(never sacct: accounting is often off). PENDING, a requeue in progress,
SUSPENDED or CONFIGURING make the handle `waiting` (the job's state `waiting`,
with SLURM's reason); RUNNING makes it run. A job SLURM requeued by itself
(pre-emption, node failure, `scontrol requeue`, the script at its time limit) is
the same attempt running again from its newest checkpoint. A final state ends
the attempt: the trainer's exit code comes from the script's last line in the
log, else from SLURM's ExitCode; TIMEOUT, PREEMPTED, NODE_FAIL, OUT_OF_MEMORY
and an scancel from outside give the outcome themselves (`ended_by`).

Never two allocations: `reserve` lists this user's jobs (squeue) and waits while
any job of this nanod job, of any attempt, is still queued or running; the job
name `<job>.a<N>.nanod<home hash>` says whose it is. A restarted daemon adopts
an attempt by its recorded job id, or by that name when it died before
recording the id. The batch job outlives the daemon by design
(`outlives_daemon`): a daemon that stops leaves it running, the next one
follows it.

Stopping: `terminate` is SIGCONT to every process of the job and USR2 to the
script, which passes one SIGTERM to the trainer (emergency checkpoint, exit);
`kill` is `scancel`. A pending job is simply scancelled.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.atomic import write_bytes_atomic
from daemon.attempt_log import last_error_line, read_tail
from daemon.launchers import torchrun
from daemon.launchers.slurm_script import EXIT_MARK, render_script, sbatch_options
from daemon.trainers import Outcome

CLIENT_TIMEOUT = 20.0   # s: a slurmctld that does not answer must not hold the daemon's loop for long
# states in which the job no longer runs and never will again
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY", "REVOKED"}
# states in which it is queued, not running: the stall clock must not run
PENDING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "CONFIGURING", "SUSPENDED",
           "RESV_DEL_HOLD", "STOPPED"}
# final states that a job submitted with --requeue may show for a moment before SLURM requeues it
MAYBE_REQUEUED = {"PREEMPTED", "NODE_FAIL"}
_EXIT = re.compile(r"^# nanod: slurm job \S+ " + re.escape(EXIT_MARK) + r"(-?\d+)", re.M)
# environment a batch job must not inherit from the daemon's: SLURM's own (the daemon may itself run in an
# allocation), sbatch's input variables (the script's #SBATCH lines are the whole truth) and this machine's GPUs
_DROP_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
_KEEP = {"SLURM_CONF"}
_DROP = {"CUDA_VISIBLE_DEVICES"}


class SlurmError(OSError):
    """A SLURM command failed; str() is its one-line error, naming the command."""

    names_program = True   # (attempts.py does not prefix the trainer's interpreter to it)


def run_client(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """A SLURM client command's stdout; SlurmError with its error line when it fails or hangs."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=CLIENT_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]}: not found (is the SLURM client installed, and on PATH?)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]}: no answer from SLURM within {CLIENT_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise SlurmError(f"{argv[0]}: {e.strerror or e}") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        line = lines[-1] if lines else f"exit {r.returncode}"
        raise SlurmError(line if line.startswith(f"{argv[0]}: ") else f"{argv[0]}: {line}")
    return r.stdout


@dataclass(frozen=True)
class JobInfo:
    """What `scontrol show job -o` says of one job (the fields nanod uses)."""

    job_id: str
    name: str
    state: str
    reason: str
    restarts: int
    node: str
    exit_code: int | None     # the batch script's exit status, or minus the signal that ended it

    @classmethod
    def parse(cls, text: str) -> "JobInfo | None":
        def field(key: str) -> str:
            m = re.search(rf"(?:^|\s){key}=(\S*)", text)
            return m.group(1) if m else ""
        if not field("JobId"):
            return None
        code = None
        m = re.fullmatch(r"(\d+):(\d+)", field("ExitCode"))
        if m:
            code = -int(m.group(2)) if int(m.group(2)) else int(m.group(1))
        node = field("BatchHost") or field("NodeList")
        restarts = field("Restarts")
        return cls(job_id=field("JobId"), name=field("JobName"), state=field("JobState"),
                   reason="" if field("Reason") in ("None", "(null)") else field("Reason"),
                   restarts=int(restarts) if restarts.isdigit() else 0,
                   node="" if node in ("(null)", "None") else node, exit_code=code)


def show_job(job_id: str) -> JobInfo | None:
    """The job as slurmctld knows it; None once it has forgotten it (MinJobAge after its end)."""
    try:
        out = run_client(["scontrol", "show", "job", "-o", str(job_id)])
    except SlurmError as e:
        if "Invalid job id" in str(e):
            return None
        raise
    return JobInfo.parse(out.splitlines()[0] if out.strip() else "")


def list_jobs() -> list[tuple[str, str, str]]:
    """(id, name, state) of this user's jobs that are queued or running (squeue's default states)."""
    out = run_client(["squeue", "-h", "--me", "-o", "%i|%j|%T"])
    return [tuple(line.split("|", 2)) for line in out.splitlines() if line.count("|") == 2]


def home_tag(settings) -> str:
    """Six hex digits of the home's path: two homes' jobs of the same name are told apart."""
    return hashlib.sha256(str(settings.home).encode()).hexdigest()[:6]


def job_name(settings, job: str, attempt_n: int) -> str:
    """`<job>.a<N>.nanod<tag>`: the nanod job first, so squeue's short NAME column still says it."""
    return f"{job}.a{attempt_n}.nanod{home_tag(settings)}"


def ours(settings, job: str, name: str) -> int | None:
    """The attempt number if `name` is one of this home's batch jobs of `job`, else None."""
    head, sep, tail = name.rpartition(f".nanod{home_tag(settings)}")
    if not sep or tail:
        return None
    job_part, sep, n = head.rpartition(".a")
    return int(n) if sep and job_part == job and n.isdigit() else None


def script_path(settings, job: str, attempt_n: int) -> Path:
    return settings.home / "slurm" / job / f"attempt-{attempt_n:03d}.sh"


def clean_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k in _KEEP or not (k in _DROP or k.startswith(_DROP_PREFIXES))}


class SlurmJob:
    """One attempt's batch job, as the loop sees it (AttemptHandle)."""

    outlives_daemon = True   # a stopping daemon leaves it running; the next one adopts it

    def __init__(self, job_id: str, *, name: str, log: Path, poll_interval: float, ranks: int = 1,
                 script: str = "", restarts: int | None = None):
        self.job_id, self.name, self.log, self.ranks, self.script = job_id, name, log, ranks, script
        self.poll_interval = poll_interval
        self.pid, self.pgid, self.proc_start = None, None, None   # no process of ours
        self.returncode: int | None = None
        self.exited = False
        self.ended_by: tuple[Outcome, str] | None = None   # an outcome SLURM's state says by itself
        self.info: JobInfo | None = None
        self.trouble = ""              # the last failed look, while SLURM does not answer
        self.restarts_seen = restarts  # None until the first look
        self.since = time.time()
        self.events: list[tuple[str, str]] = []
        self._next_poll = 0.0
        self._final_seen = ""
        self._run_restarts = restarts or 0   # the restart count of the run seen last

    # -- following
    def poll(self) -> bool:
        """True once the job has ended for good (looks at SLURM at most every poll_interval)."""
        if self.exited:
            return True
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + self.poll_interval
        try:
            info = show_job(self.job_id)
        except SlurmError as e:
            if not self.trouble:
                self.events.append(("slurm_trouble", f"cannot read SLURM job {self.job_id}: {e}"))
            self.trouble = str(e)
            return False
        self.trouble = ""
        if info is None:   # forgotten by slurmctld: it ended while nobody looked
            return self._end(None)
        self._see(info)
        if info.state in FINAL:
            if info.state in MAYBE_REQUEUED and self._final_seen != info.state:
                self._final_seen = info.state   # requeued next? look once more before believing it
                self._next_poll = now
                return False
            return self._end(info)
        return False

    def _see(self, info: JobInfo) -> None:
        old = self.info
        if old is None or (old.state, old.reason, old.node) != (info.state, info.reason, info.node):
            self.since = time.time()
        if self.restarts_seen is not None and info.restarts > self.restarts_seen:
            self.events.append(("slurm_requeue", f"SLURM requeued job {self.job_id} (restart {info.restarts}): "
                                "its next run resumes from the newest complete checkpoint"))
        self.restarts_seen = info.restarts
        if info.state == "RUNNING":
            self._run_restarts = info.restarts
        self.info = info

    def _end(self, info: JobInfo | None) -> bool:
        self.exited = True
        tail = read_tail(self.log)
        marks = _EXIT.findall(tail)
        code = int(marks[-1]) if marks else (info.exit_code if info is not None else None)
        if code is not None and self.ranks > 1:
            code = torchrun.rank_returncode(code, tail)   # torchrun exits 1 whatever a rank said
        self.returncode = code
        state = info.state if info is not None else ""
        limit = f"SLURM job {self.job_id}"
        self.ended_by = {
            "TIMEOUT": (Outcome.INTERRUPTED, f"{limit} reached its time limit before the trainer stopped"),
            "PREEMPTED": (Outcome.INTERRUPTED, f"{limit} was pre-empted and not requeued"),
            "NODE_FAIL": (Outcome.CRASHED, f"{limit}: its node {info.node if info else ''} failed"),
            "BOOT_FAIL": (Outcome.CRASHED, f"{limit}: its node failed to boot"),
            "OUT_OF_MEMORY": (Outcome.CRASHED, f"{limit} ran out of host memory (raise slurm.mem)"),
            "DEADLINE": (Outcome.CRASHED, f"{limit} missed its deadline"),
            "REVOKED": (Outcome.CRASHED, f"{limit} was revoked"),
            "CANCELLED": (Outcome.CANCELLED, f"{limit} was cancelled (scancel)"),
        }.get(state)
        if marks and code == 0:
            self.ended_by = None   # the trainer completed (and said so), whatever came after
        return True

    # -- what the loop shows
    @property
    def waiting(self) -> str | None:
        """Why the attempt is not running now (pending, being requeued, suspended), or None while it runs."""
        info = self.info
        if info is None:
            return f"SLURM job {self.job_id} submitted" + (f"; {self.trouble}" if self.trouble else "")
        requeued = f", requeued {info.restarts}x" if info.restarts else ""
        if info.state in PENDING:
            return f"SLURM job {self.job_id} {info.state.lower()} ({info.reason or 'no reason given'}{requeued})"
        if info.state == "COMPLETING" and info.restarts > self._run_restarts:
            return f"SLURM job {self.job_id} being requeued{requeued}"   # killed for a requeue: pending next
        return None

    def record(self) -> dict:
        """For the attempt's record (status reads it when the daemon is down)."""
        info = self.info
        return {"job_id": self.job_id, "name": self.name, "state": info.state if info else "SUBMITTED",
                "reason": info.reason if info else "", "node": info.node if info else "",
                "restarts": info.restarts if info else 0, "since": self.since, "script": self.script}

    def take_events(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events

    def running_on(self) -> str:
        node = self.info.node if self.info and self.info.node else "?"
        return f"SLURM job {self.job_id} running on {node}"

    # -- stopping
    def terminate(self) -> None:
        """The trainer saves and stops: SIGCONT to all of the job, USR2 to the script (which sends one
        SIGTERM on). A job that is not running has nothing to save, and scancel --signal would wait on
        it for minutes ("try again later"): scancel."""
        try:
            info = show_job(self.job_id)   # now, not as last polled: it may have been requeued since
        except SlurmError:
            info = None
        if info is not None:
            self._see(info)
        if self.info is None or self.info.state != "RUNNING":
            return self.kill()
        for argv in (["scancel", "--full", "--signal=CONT", self.job_id],
                     ["scancel", "--batch", "--signal=USR2", self.job_id]):
            try:
                run_client(argv)
            except SlurmError as e:
                self.events.append(("slurm_trouble", f"{' '.join(argv)}: {e}"))
        self._next_poll = 0.0

    def kill(self) -> None:
        try:
            run_client(["scancel", self.job_id])
        except SlurmError as e:
            self.events.append(("slurm_trouble", f"scancel {self.job_id}: {e}"))
        self._next_poll = 0.0

    def describe(self) -> str:
        return f"SLURM job {self.job_id}"

    def trainer_tail(self, tail: str) -> str:
        return torchrun.trainer_output(tail) if self.ranks > 1 else tail

    def error_line(self, tail: str, returncode: int | None = None) -> str:
        if self.ended_by:
            return self.ended_by[1]
        return torchrun.error_line(tail) if self.ranks > 1 else last_error_line(tail, returncode)


# squeue is asked at most every slurm_poll_interval while a job waits for SLURM or its older batch job
# (module state: a launcher is made per call)
_reserve_failed: dict[str, tuple[float, str]] = {}


class SlurmLauncher:
    """Launcher for a SLURM cluster: no local lock; each attempt one batch job."""

    name = "slurm"
    resumes_itself = True   # the trainer runs with --resume_from_step=auto (a requeued job has no daemon)

    def __init__(self, settings):
        self.settings = settings

    def reserve(self, rec) -> tuple | str:
        """Nothing to hold, but no second allocation: wait while any batch job of this job lives."""
        key = f"{self.settings.home}/{rec.name}"
        failed = _reserve_failed.get(key)
        if failed and time.monotonic() - failed[0] < self.settings.slurm_poll_interval:
            return failed[1]
        try:
            jobs = list_jobs()
        except SlurmError as e:
            why = f"waiting for SLURM to answer: {e}"
            _reserve_failed[key] = (time.monotonic(), why)
            return why
        _reserve_failed.pop(key, None)
        for job_id, name, state in jobs:
            n = ours(self.settings, rec.name, name)
            if n is not None:
                why = (f"waiting for SLURM job {job_id} (attempt {n}, {state}) to end: "
                       "one allocation at a time (scancel it to go on)")
                _reserve_failed[key] = (time.monotonic(), why)   # asked again in a few seconds, not every tick
                return why
        return ()

    def release(self, reservation) -> None:
        pass

    def place_env(self, rec) -> dict[str, str]:
        return {}   # CUDA_VISIBLE_DEVICES is SLURM's to set on the node

    def start(self, rec, launch, env: dict[str, str], log: Path, reservation, *, header: str = "") -> SlurmJob:
        """Write the script and the log's header, submit. Raises SlurmError (an OSError) when sbatch refuses."""
        spec, n = rec.job_spec, rec.last_attempt.n
        name = job_name(self.settings, rec.name, n)
        argv = launch.argv if spec.world_size == 1 else torchrun.wrap(launch.argv, spec.world_size)
        workdir = Path(launch.cwd) if launch.cwd else self.settings.home
        options = sbatch_options(spec.slurm, job_name=name, log=log, workdir=workdir)
        script = script_path(self.settings, rec.name, n)
        for d in (script.parent.parent, script.parent, log.parent):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_bytes_atomic(script, render_script(argv, options, title=header or name).encode())
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"# nanod: {header} (sbatch {script})\n".encode() if header else b"")
        finally:
            os.close(fd)
        out = run_client(["sbatch", "--parsable", str(script)], env=clean_env(env), cwd=workdir)
        job_id = out.strip().split(";")[0]
        if not job_id:
            raise SlurmError(f"sbatch: no job id in its answer {out.strip()!r}")
        return SlurmJob(job_id, name=name, log=log, poll_interval=self.settings.slurm_poll_interval,
                        ranks=spec.world_size, script=str(script), restarts=0)

    def adopt(self, rec, att) -> SlurmJob | None:
        """The attempt's batch job by its recorded id, else by its name (the daemon died before
        recording it); None when it was never submitted. An ended job is adopted too: its end is read."""
        known = att.slurm or {}
        job_id = known.get("job_id")
        name = job_name(self.settings, rec.name, att.n)
        if not job_id:
            try:
                job_id = next((i for i, nm, _ in list_jobs() if nm == name), None)
            except SlurmError:
                job_id = None
            if not job_id:
                return None
        return SlurmJob(str(job_id), name=name, log=self.settings.home / att.log,
                        poll_interval=self.settings.slurm_poll_interval, ranks=rec.job_spec.world_size,
                        script=known.get("script", ""), restarts=known.get("restarts"))
