"""The daemon's hands on attempts: launch one, watch it, and act on its end.

Runtime state (`Active`: the process handle, the log offset, stall clocks)
lives here and is never written to disk; everything durable goes through
queue.py, every decision comes from supervisor.py. What runs is the job's
trainer adapter (daemon/trainers/); where it runs, with what it must hold
(the GPU lock), is the job's launcher (daemon/launchers/). The loop
(daemon/loop.py) calls these methods in its fixed order.

A launch reserves what the launcher needs (the local one: the GPU lock),
starts the attempt, which from then on holds it by itself, and records it.
After a restart, `recover` finds an attempt the previous daemon left running
(the launcher adopts it) and stops it gracefully; the relaunch then waits for
the lock, so no two trainers ever run at once. An attempt that is meant to
outlive the daemon (a SLURM batch job: `outlives_daemon`) is followed instead,
and a stopping daemon leaves it running. Such a handle may also say that its
attempt is queued rather than running (`waiting`: the job is `waiting`, no stall
clock runs), what the record should keep of it (`record()`), events of its own
(`take_events()`), and an outcome its place decided (`ended_by`: a time limit,
a failed node).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from daemon import supervisor
from daemon.attempt_log import LogTail, last_error_line, log_path, read_tail
from daemon.launchers import AttemptHandle, attempt_env, launcher_for
from daemon.queue import Attempt, JobRecord, JobState, Queue, append_event
from daemon.supervisor import Action, Decision
from daemon.trainers import Outcome, Progress, adapter_for
from trainer import layout

log = logging.getLogger("nanod")
S = JobState
CHECKPOINT_SCAN_INTERVAL = 1.0   # s between looks at the checkpoint directory of a live attempt
PROGRESS_SAVE_INTERVAL = 0.5     # s: progress reaches the record at most twice a second


def newest_checkpoint(ckpt_dir: Path, *, since: float | None = None, is_complete=layout.is_complete) -> int | None:
    """The newest complete checkpoint (the adapter's is_complete, trainer.layout's by default) whose
    meta was written at or after `since` (a stale directory of an older job with the same model_tag
    is not resumed from)."""
    for step in reversed(layout.list_steps(ckpt_dir)):
        if not is_complete(ckpt_dir, step):
            continue
        if since is not None:
            try:
                if layout.meta_path(ckpt_dir, step).stat().st_mtime < since - 2.0:
                    continue
            except OSError:
                continue
        return step
    return None


@dataclass
class Active:
    """A live attempt and what the loop knows about it right now."""

    rec: JobRecord
    proc: AttemptHandle
    adapter: object
    phase: str
    ckpt_dir: Path
    tail: LogTail
    since: float | None          # when this phase's first attempt started: older checkpoints are not ours
    start_ckpt: int | None       # newest complete checkpoint when the attempt started
    last_ckpt: int | None
    last_activity: float         # monotonic: the last step line or new checkpoint
    total: int | None = None
    saw_step: bool = False
    paused: bool = False
    stop: str | None = None      # why we are stopping it: shutdown, cancel, stall, survivor
    kill_at: float | None = None  # monotonic SIGKILL deadline
    unsaved: bool = False
    saved_at: float = 0.0
    scanned_at: float = 0.0


class Attempts:
    def __init__(self, settings, queue: Queue, preflight=None, retention=None):
        self.settings, self.queue = settings, queue
        self.preflight, self.retention = preflight, retention
        self.active: dict[str, Active] = {}
        self.stopping = False
        self._checked: set[tuple[str, int, int]] = set()   # (job, phase_index, seq) preflighted this run

    # ---- recovery after a restart ---------------------------------------------------
    def recover(self) -> None:
        """Adopt what the previous daemon left: stop its survivors, settle attempts that ended unwatched."""
        for rec in self.queue.ordered(S.RUNNING, S.PAUSED, S.WAITING, S.BACKING_OFF):
            att = rec.last_attempt
            if att is not None and att.ended_at is None:
                proc = launcher_for(self.settings, rec.job_spec).adopt(rec, att)
                a = self._watch(rec, att, proc or _Ended(att))
                if proc is None:
                    continue   # ended while no daemon watched: settled by the next reap
                if getattr(proc, "outlives_daemon", False):
                    self.queue.note(rec, "adopted", f"following {proc.describe()} (attempt {att.n}), left "
                                    "running by the previous daemon", attempt=att.n)
                    continue
                a.stop = "survivor"
                a.kill_at = time.monotonic() + rec.job_spec.recovery.kill_grace
                proc.terminate()
                self.queue.note(rec, "survivor", f"attempt {att.n} (pid {proc.pid}) outlived the previous daemon: "
                                "stopping it to resume from its checkpoint under this one", attempt=att.n)
            elif rec.state in (S.RUNNING, S.PAUSED):
                self.queue.back_off(rec, 0, "resuming after a daemon restart", kind="relaunch", attempt=None)
        # a previous daemon may have died between a save and its prune: unfinished jobs' folders now
        # (only the phases they have run: a folder not yet theirs may hold another run's checkpoints)
        for rec in self.queue.ordered():
            if not rec.finished and rec.attempts:
                self.prune(rec, sorted({att.phase for att in rec.attempts}))

    # ---- launching -------------------------------------------------------------------
    def start_next(self) -> None:
        """The head of the queue, for each GPU that has no current job.

        A queued job whose GPUs are not all free keeps them for its turn: a later
        job on one of them does not start before it (no starving the wide job)."""
        busy = {g for r in self.queue.ordered(S.RUNNING, S.PAUSED, S.WAITING, S.BACKING_OFF)
                for g in r.job_spec.gpu_indices}
        for rec in self.queue.ordered(S.QUEUED):
            gpus = set(rec.job_spec.gpu_indices)
            if not gpus & busy:
                self.launch(rec)
            busy |= gpus

    def relaunch_due(self) -> None:
        now = time.time()
        for rec in self.queue.ordered(S.BACKING_OFF, S.WAITING):
            if rec.name in self.active:
                continue
            if rec.state == S.WAITING or rec.next_attempt_at is None or rec.next_attempt_at <= now:
                self.launch(rec)

    def next_due(self) -> float | None:
        dues = [r.next_attempt_at for r in self.queue.ordered(S.BACKING_OFF) if r.next_attempt_at]
        return min(dues) if dues else None

    def launch(self, rec: JobRecord) -> None:
        """Start the next attempt of `rec`, or leave it waiting with the reason why not."""
        spec, i = rec.job_spec, rec.phase_index
        phase = spec.phases[i].phase
        adapter = adapter_for(self.settings, spec)
        dbs = self._batch_size(rec)
        if self.preflight is not None and hasattr(self.preflight, "disk_shortfall"):
            short = self.preflight.disk_shortfall(self.settings, spec, i)
            if short:
                return self._wait(rec, short, kind="disk_low")
        if not self._preflight(rec, dbs):
            return
        launcher = launcher_for(self.settings, spec)
        reservation = launcher.reserve(rec)
        if isinstance(reservation, str):
            return self._wait(rec, reservation)
        try:
            self._start(rec, adapter, launcher, phase, dbs, reservation)
        finally:
            launcher.release(reservation)   # the attempt holds its own copy from here on

    def _start(self, rec: JobRecord, adapter, launcher, phase: str, dbs: int | None, reservation) -> None:
        spec, i = rec.job_spec, rec.phase_index
        args = dict(spec.phases[i].args)
        tag = str(args.get("model_tag") or spec.resolved_model_tag)
        ckpt_dir = adapter.checkpoint_dir(self.settings.checkpoint_root, phase, tag)
        earlier = [a for a in rec.attempts if a.phase == phase]
        if not earlier and (foreign := [s for s in layout.list_steps(ckpt_dir) if adapter.is_complete(ckpt_dir, s)]):
            # another run's checkpoints: resuming them would mix two runs, and retention would take
            # their higher steps for the newest and delete this job's own saves
            why = (f"{phase}: {ckpt_dir} already holds checkpoints of another run (steps {foreign[0]}-{foreign[-1]}):"
                   " use a new model_tag, or move that folder away")
            return self._apply(rec, Decision(Action.FAIL, why, "failed"), None, len(rec.attempts) + 1)
        since = earlier[0].started_at if earlier else None
        resume = newest_checkpoint(ckpt_dir, since=since, is_complete=adapter.is_complete) \
            if earlier and adapter.can_resume(phase) else None
        init = rec.phase_final_steps.get(spec.phases[i - 1].phase) if i > 0 and resume is None else None
        # a launcher whose attempt restarts without the daemon (SLURM's requeue) has the trainer find its
        # newest complete checkpoint itself at each start, the first one too (none yet: fresh)
        itself = getattr(launcher, "resumes_itself", False)
        if itself and i > 0:
            init = rec.phase_final_steps.get(spec.phases[i - 1].phase)
        if dbs is not None:
            args["device_batch_size"] = dbs
            rec.device_batch_size[phase] = dbs
        n = len(rec.attempts) + 1
        try:
            launch = adapter.build_launch(spec, i, args=args, resume_from="auto" if itself else resume,
                                          init_from=init)
        except ValueError as e:  # an adapter's one-line refusal (nanochat: NanochatRefused)
            return self._apply(rec, Decision(Action.FAIL, f"{phase}: {e}", "failed"), None, n)
        for note in getattr(launch, "notes", ()):
            self.queue.note(rec, "runner_note", note)
        if dbs is None and launch.device_batch_size is not None:   # the adapter chose for `auto`
            dbs = rec.device_batch_size[phase] = launch.device_batch_size
        if earlier and not adapter.can_resume(phase):
            self.queue.note(rec, "restart_from_start",
                            f"restarted from the start: this {getattr(adapter, 'name', spec.runner)} phase cannot resume")
        log_file = log_path(self.settings, rec.name, n)
        att = Attempt(n=n, phase=phase, started_at=time.time(), resumed_from=resume, init_from=init,
                      device_batch_size=dbs, log=str(log_file.relative_to(self.settings.home)))
        self.queue.begin_attempt(rec, att)   # on record before the process exists: a crash here is visible
        env = attempt_env(self.settings, spec, i, n, trainer_env=launch.env, defaults=adapter.default_env(phase),
                          place_env=launcher.place_env(rec))
        try:
            proc = launcher.start(rec, launch, env, log_file, reservation,
                                  header=f"job {rec.name}, phase {phase}, attempt {n}: {' '.join(launch.argv)}")
        except OSError as e:
            error = str(e) if getattr(e, "names_program", False) else f"{launch.argv[0]}: {e.strerror or e}"
            self.queue.end_attempt(rec, outcome=Outcome.FAILED_TO_START.value, exit_code=None, error=error)
            d = supervisor.decide(Outcome.FAILED_TO_START, phase=phase, phase_index=i, n_phases=len(spec.phases),
                                  recovery=spec.recovery, restarts_without_progress=rec.restarts_without_progress,
                                  progressed=False, device_batch_size=dbs, exit_words="", error=error)
            return self._apply(rec, d, None, n)
        att.pid, att.pgid, att.proc_start = proc.pid, proc.pgid, proc.proc_start
        if hasattr(proc, "record"):
            att.slurm = proc.record()
        since = since or att.started_at
        how = f"resumed from step {resume}" if resume is not None else \
            f"from {spec.phases[i - 1].phase} step {init}" if init is not None else "fresh"
        queued = getattr(proc, "waiting", None)
        self.queue.transition(rec, S.WAITING if queued else S.RUNNING,
                              f"phase {phase}, attempt {n} ({how})" + (f": {queued}" if queued else ""),
                              kind="started", attempt=n)
        a = self._watch(rec, att, proc)
        a.since, a.start_ckpt, a.last_ckpt = since, resume, resume

    def _watch(self, rec: JobRecord, att: Attempt, proc: AttemptHandle) -> Active:
        spec = rec.job_spec
        adapter = adapter_for(self.settings, spec)
        args = spec.phases[rec.phase_index].args
        tag = str(args.get("model_tag") or spec.resolved_model_tag)
        ckpt_dir = adapter.checkpoint_dir(self.settings.checkpoint_root, att.phase, tag)
        earlier = [a for a in rec.attempts if a.phase == att.phase]
        since = earlier[0].started_at if earlier else att.started_at
        total = args.get("num_iterations") if isinstance(args.get("num_iterations"), int) else None
        a = Active(rec=rec, proc=proc, adapter=adapter, phase=att.phase, ckpt_dir=ckpt_dir,
                   tail=LogTail(self.settings.home / att.log), since=since, start_ckpt=att.resumed_from,
                   last_ckpt=att.resumed_from, last_activity=time.monotonic(),
                   total=total if total and total > 0 else None)
        self.active[rec.name] = a
        return a

    def _batch_size(self, rec: JobRecord) -> int | None:
        """The working device_batch_size of rec's phase (supervisor.phase_batch_size decides); a value
        reused from an earlier auto phase becomes this phase's at once, said once."""
        phase = rec.job_spec.phases[rec.phase_index].phase
        dbs, reused = supervisor.phase_batch_size(rec.job_spec, rec.phase_index, rec.device_batch_size)
        if reused:
            rec.device_batch_size[phase] = dbs   # however long the launch then waits, not said again
            self.queue.note(rec, "autofit", reused)
        return dbs

    def _preflight(self, rec: JobRecord, dbs: int | None) -> bool:
        """check_phase once per phase start (per daemon run): FAIL fails the job, WARN is noted."""
        key = (rec.name, rec.phase_index, rec.seq)
        if self.preflight is None or not hasattr(self.preflight, "check_phase") or key in self._checked:
            return True
        self._checked.add(key)
        try:
            checks = self.preflight.check_phase(self.settings, rec.job_spec, rec.phase_index, device_batch_size=dbs)
        except Exception as e:  # a broken check must not stop training
            log.exception("nanod: preflight failed")
            self.queue.note(rec, "preflight", f"preflight could not run: {e}")
            return True
        fails = [c.message for c in checks if c.level == "FAIL"]
        for c in checks:
            if c.level == "WARN":
                self.queue.note(rec, "preflight_warning", c.message)
        if fails:
            self.queue.transition(rec, S.FAILED, f"preflight: {'; '.join(fails)}", kind="preflight_failed")
            return False
        return True

    def _wait(self, rec: JobRecord, reason: str, kind: str = "waiting") -> None:
        self.queue.transition(rec, S.WAITING, reason, kind=kind if rec.state != S.WAITING else None)

    # ---- watching --------------------------------------------------------------------
    def read_progress(self) -> None:
        now = time.monotonic()
        for a in list(self.active.values()):
            self._read_lines(a, now)
            if now - a.scanned_at >= CHECKPOINT_SCAN_INTERVAL:
                a.scanned_at = now
                self._scan_checkpoints(a, now)
            if a.unsaved and now - a.saved_at >= PROGRESS_SAVE_INTERVAL:
                self.queue.save(a.rec)
                a.unsaved, a.saved_at = False, now

    def _read_lines(self, a: Active, now: float) -> None:
        rec = a.rec
        for line in a.tail.read_lines():
            p: Progress | None = a.adapter.parse_progress(line)
            if p is not None:
                a.last_activity, a.saw_step, a.paused = now, True, False
                a.total = p.total or a.total
                self.queue.set_progress(rec, a.phase, p, save=False)
                a.unsaved = True
                if rec.state == S.PAUSED:
                    self.queue.transition(rec, S.RUNNING, f"phase {a.phase}, step {p.step}", kind="resumed")
            elif (chosen := _batch_choice(a.adapter, line)) is not None:
                self._batch_chosen(a, chosen, line)
            elif line.startswith("paused:"):
                a.paused = True
                if rec.state == S.RUNNING:
                    self.queue.transition(rec, S.PAUSED, line.strip(), kind="paused")
            elif line.startswith("resumed:"):
                a.paused, a.last_activity = False, now   # the stall clock starts again; a step line says running

    def _batch_chosen(self, a: Active, chosen: int, line: str) -> None:
        """The trainer's auto-fit chose device_batch_size: the attempt used it, later attempts of the
        phase get it given (no new probe), and an OOM halves it as for a given value."""
        rec, att = a.rec, a.rec.last_attempt
        if att is None or att.device_batch_size == chosen:
            return
        att.device_batch_size = chosen
        rec.device_batch_size[a.phase] = chosen
        self.queue.note(rec, "autofit", f"{a.phase}: {line.strip()}", attempt=att.n)

    def _scan_checkpoints(self, a: Active, now: float) -> None:
        newest = newest_checkpoint(a.ckpt_dir, since=a.since, is_complete=a.adapter.is_complete)
        if newest is not None and (a.last_ckpt is None or newest > a.last_ckpt):
            a.last_ckpt, a.last_activity = newest, now
            self.queue.set_checkpoint(a.rec, a.phase, newest, layout.size_of(a.ckpt_dir, newest))
            self.prune(a.rec, [a.phase])

    def prune(self, rec: JobRecord, phases) -> None:
        """Hold keep_last now in rec's folders of `phases`; retention.prune_job owns what goes.

        Called on a live attempt's new checkpoint, at the end of every attempt
        (a phase's end included) and at daemon start: checkpoints that came
        faster than the scan, or an attempt killed right after a save, are
        pruned before a user can look. Trouble is noted, never raised.
        """
        if self.retention is None:
            return
        try:
            results = self.retention.prune_job(self.settings.checkpoint_root, self.queue.ordered(), rec.name,
                                               phases=phases)
        except Exception as e:  # deletion trouble is logged, never fatal
            log.exception("nanod: retention failed")
            self.queue.note(rec, "prune_error", f"retention failed: {e}")
            return
        for pol, res in results:
            if res.deleted_steps:
                self.queue.note(rec, "pruned", f"{pol.phase}: deleted checkpoint steps "
                                f"{', '.join(map(str, res.deleted_steps))} (keep_last {pol.keep_last})")
            for err in res.errors[:3]:
                self.queue.note(rec, "prune_error", err)

    def detect_stalls(self) -> None:
        now = time.monotonic()
        for a in self.active.values():
            rc = a.rec.job_spec.recovery
            if a.stop is None and a.rec.state != S.WAITING and supervisor.is_stalled(now=now, last_activity=a.last_activity, saw_step=a.saw_step,
                                                        paused=a.paused, stall_timeout=rc.stall_timeout,
                                                        startup_grace=rc.startup_grace):
                quiet = now - a.last_activity
                self._stop(a, "stall", f"no step line and no new checkpoint for {quiet:.0f}s: "
                           f"stopping {a.proc.describe()}")

    def enforce_deadlines(self) -> None:
        now = time.monotonic()
        for a in self.active.values():
            if a.kill_at is not None and now >= a.kill_at:
                a.kill_at = None
                a.proc.kill()
                self.queue.note(a.rec, "killed", f"{a.proc.describe()} outlived kill_grace: SIGKILL",
                                attempt=a.rec.last_attempt.n)

    def _stop(self, a: Active, why: str, message: str) -> None:
        """SIGTERM (+SIGCONT) to the attempt's group; SIGKILL after the job's kill_grace."""
        a.stop = why
        deadline = time.monotonic() + a.rec.job_spec.recovery.kill_grace
        a.kill_at = deadline if a.kill_at is None else min(a.kill_at, deadline)
        a.proc.terminate()
        self.queue.note(a.rec, f"stop_{why}", message, attempt=a.rec.last_attempt.n)

    def stop_all(self) -> None:
        """The daemon's warm stop: every attempt saves and exits; jobs between attempts go back to the queue."""
        self.stopping = True
        left = [a for a in self.active.values() if a.stop is None and getattr(a.proc, "outlives_daemon", False)]
        for a in left:   # a SLURM job trains on without the daemon; the next one adopts it
            del self.active[a.rec.name]
            self.queue.note(a.rec, "left_running", f"the daemon is stopping: {a.proc.describe()} runs on; "
                            "the next daemon follows it", attempt=a.rec.last_attempt.n)
        for a in self.active.values():
            if a.stop is None:
                self._stop(a, "shutdown", f"the daemon is stopping: SIGTERM to {a.proc.describe()}")
            elif a.stop == "stall":
                a.stop = "shutdown"  # already signalled: a second SIGTERM would abort its emergency save
        for rec in self.queue.ordered(S.WAITING, S.BACKING_OFF):
            if rec.name not in self.active and rec.name not in {a.rec.name for a in left}:
                self.queue.requeue_front(rec, "the daemon stopped; resumes at the next start")

    def kill_all(self) -> None:
        for a in self.active.values():
            a.proc.kill()

    # ---- the end of an attempt -------------------------------------------------------
    def reap(self) -> None:
        for a in list(self.active.values()):
            if a.proc.poll():
                self._finish(a)
            elif hasattr(a.proc, "waiting"):
                self._follow(a)

    def _follow(self, a: Active) -> None:
        """Mirror a queued place (SLURM): pending or being requeued -> waiting, running -> running,
        its record and its events into the job's. Each (re)start gets startup_grace before a stall."""
        rec, att = a.rec, a.rec.last_attempt
        for kind, message in a.proc.take_events():
            self.queue.note(rec, kind, message, attempt=att.n)
        info = a.proc.record()
        if info != att.slurm:
            self.queue.set_attempt_slurm(rec, info)
        queued = a.proc.waiting
        if queued and (rec.state != S.WAITING or rec.reason != queued):
            kind = "waiting" if rec.state != S.WAITING else None
            self.queue.transition(rec, S.WAITING, queued, kind=kind, attempt=att.n)
            a.saw_step, a.paused = False, False
        elif not queued and rec.state == S.WAITING:
            self.queue.transition(rec, S.RUNNING, f"phase {a.phase}, attempt {att.n}: {a.proc.running_on()}",
                                  attempt=att.n)
            a.saw_step, a.last_activity = False, time.monotonic()

    def _finish(self, a: Active) -> None:
        rec, att = a.rec, a.rec.last_attempt
        self._read_lines(a, time.monotonic())
        newest = newest_checkpoint(a.ckpt_dir, since=a.since, is_complete=a.adapter.is_complete)
        if newest is not None and (a.last_ckpt is None or newest > a.last_ckpt):
            a.last_ckpt = newest
            self.queue.set_checkpoint(rec, a.phase, newest, layout.size_of(a.ckpt_dir, newest))
        raw = read_tail(self.settings.home / att.log)
        # the trainer's own words: a torchrun group's report and chatter are the launcher's, not the trainer's
        tail = a.proc.trainer_tail(raw) if hasattr(a.proc, "trainer_tail") else raw
        code = a.proc.returncode
        error = a.proc.error_line(raw, code) if hasattr(a.proc, "error_line") else last_error_line(raw, code)
        ended_by = getattr(a.proc, "ended_by", None)   # the place's own word: a time limit, a failed node
        if ended_by is not None:
            outcome = ended_by[0]
        elif code is None:  # a survivor, or an attempt that ended while no daemon watched: no exit code
            done = a.total is not None and newest == a.total
            outcome = Outcome.COMPLETED if done else Outcome.INTERRUPTED if a.stop else Outcome.CRASHED
            if outcome == Outcome.CRASHED:
                error = f"ended while no daemon was watching{': ' + error if error else ''}"
        else:
            outcome = a.adapter.classify_exit(code, tail)
        if outcome != Outcome.COMPLETED:
            outcome = {"stall": Outcome.STALLED, "cancel": Outcome.CANCELLED, "shutdown": Outcome.INTERRUPTED,
                       "survivor": Outcome.INTERRUPTED}.get(a.stop, outcome)
        del self.active[rec.name]
        if hasattr(a.proc, "record"):
            att.slurm = a.proc.record()   # its last state, saved with the end
        self.queue.end_attempt(rec, outcome=outcome.value, exit_code=code,
                               error="" if outcome == Outcome.COMPLETED else error)
        progressed = newest is not None and (a.start_ckpt is None or newest > a.start_ckpt)
        spec = rec.job_spec
        if a.stop == "survivor" and outcome == Outcome.INTERRUPTED:
            d = Decision(Action.RELAUNCH, f"relaunching {a.phase} from its checkpoint after the daemon restart",
                         "relaunch")
        else:
            words = "no exit code" if code is None else f"killed by signal {-code}" if code < 0 else f"exit {code}"
            d = supervisor.decide(outcome, phase=a.phase, phase_index=rec.phase_index, n_phases=len(spec.phases),
                                  recovery=spec.recovery, restarts_without_progress=rec.restarts_without_progress,
                                  progressed=progressed, device_batch_size=att.device_batch_size,
                                  exit_words=words, error=error, stopping=a.stop == "shutdown")
        if a.stop == "cancel" and d.action == Action.NEXT_PHASE:
            d = Decision(Action.CANCEL, f"cancelled after {a.phase} completed", "cancelled")
        if d.action in (Action.NEXT_PHASE, Action.DONE, Action.CANCEL) and outcome == Outcome.COMPLETED:
            rec.phase_final_steps[a.phase] = newest   # on record first: the prune keeps a phase's final step
        # before the job's new state is saved: whoever sees it done, relaunched or in its next phase
        # finds the folder holding keep_last
        self.prune(rec, [a.phase])
        self._apply(rec, d, newest, att.n)

    def _apply(self, rec: JobRecord, d: Decision, newest: int | None, n: int) -> None:
        phase = rec.phase
        if d.restarts_without_progress is not None:
            rec.restarts_without_progress = d.restarts_without_progress
        if d.device_batch_size is not None:
            rec.device_batch_size[phase] = d.device_batch_size
        action = d.action
        if self.stopping and action in (Action.RELAUNCH, Action.NEXT_PHASE):
            if action == Action.NEXT_PHASE:
                rec.phase_final_steps[phase] = newest
                rec.phase_index += 1
                rec.restarts_without_progress = 0
            self.queue.note(rec, d.kind, d.reason, attempt=n)
            return self.queue.requeue_front(rec, "the daemon stopped; resumes at the next start", attempt=n)
        if action == Action.NEXT_PHASE:
            rec.phase_final_steps[phase] = newest
            rec.phase_index += 1
            rec.restarts_without_progress = 0
            nxt = rec.phase
            self.queue.back_off(rec, 0, f"{d.reason} at step {newest}; starting {nxt}", kind=d.kind, attempt=n)
        elif action == Action.DONE:
            rec.phase_final_steps[phase] = newest
            self.queue.transition(rec, S.DONE, d.reason, kind=d.kind, attempt=n)
        elif action == Action.RELAUNCH:
            self.queue.back_off(rec, d.delay, d.reason, kind=d.kind, attempt=n)
        elif action == Action.FAIL:
            self.queue.transition(rec, S.FAILED, d.reason, kind=d.kind, attempt=n)
        elif action == Action.REQUEUE:
            self.queue.requeue_front(rec, d.reason, attempt=n)
        elif action == Action.CANCEL:
            self.queue.transition(rec, S.CANCELLED, d.reason, kind=d.kind, attempt=n)

    # ---- requests from the CLI -------------------------------------------------------
    def apply_request(self, req: dict) -> None:
        action, name = req.get("action"), req.get("job")
        rec = self.queue.get(name)
        if rec is None:
            append_event(self.settings, "error", f"{action} request for unknown job {name!r}", job=None)
            return
        if action == "cancel":
            a = self.active.get(name)
            if a is not None:
                if a.stop != "cancel":
                    self._stop(a, "cancel", f"cancel requested: SIGTERM to {a.proc.describe()}")
            elif not rec.finished:
                self.queue.transition(rec, S.CANCELLED, "cancelled by request", kind="cancelled")
        elif action == "retry":
            if rec.state in (S.FAILED, S.CANCELLED):
                self.queue.retry(rec)
            else:
                self.queue.note(rec, "error", f"retry ignored: the job is {rec.state.value}")
        else:
            append_event(self.settings, "error", f"unknown request {action!r} for job {name}", job=name)


def _batch_choice(adapter, line: str) -> int | None:
    parse = getattr(adapter, "parse_batch_choice", None)
    return parse(line) if parse is not None else None


class _Ended:
    """The handle of an attempt that ended while no daemon watched: no process, no exit code."""

    def __init__(self, att: Attempt):
        self.pid, self.pgid, self.proc_start = att.pid or 0, att.pgid or 0, att.proc_start
        self.returncode, self.exited = None, True

    def poll(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def describe(self) -> str:
        return f"process group {self.pgid}"
