"""After every exit or stall: done, next phase, relaunch, back off, or give up.

Pure functions of what happened (the attempt's Outcome, whether it made
progress, the job's recovery settings and counters); no processes, no files, no
clock. The loop applies a Decision through queue.py and records it as an event.

The rules (DESIGN.md promises 4-6):
- completed: the next phase, from this phase's final checkpoint; after the last, done.
- OOM: device_batch_size halves (floor 1; the largest divisor of it at most
  half, so a total batch divisible by the old value stays divisible), the
  trainer keeps total_batch_size by accumulating more, relaunch at once from
  the newest checkpoint; the working value holds for later attempts and
  phases. OOM at 1 fails the job.
- crash or stall: relaunch with exponential back-off (0, 1, 2, 4 s ... up to
  backoff_max). Only restarts that made no progress (no newer complete
  checkpoint than the attempt started from) count toward
  max_restarts_without_progress; progress resets the count. Over budget: failed,
  with the last error line.
- bad arguments or data, or a trainer that cannot start: failed at once.
- interrupted by our own graceful stop: back to the head of the queue.
- the batch a phase starts with (`phase_batch_size`): its working value, else the
  given number capped by an earlier OOM, else (auto) an earlier auto phase's
  choice when the shape is the same, else none: the trainer's auto-fit probes.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from daemon.trainers import Outcome


class Action(str, Enum):
    NEXT_PHASE = "next_phase"
    DONE = "done"
    RELAUNCH = "relaunch"
    FAIL = "fail"
    REQUEUE = "requeue"      # graceful stop of the daemon: head of the queue, resumes next time
    CANCEL = "cancel"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str                          # one line, for the record's reason and the event
    kind: str                            # the event's kind
    delay: float = 0.0                   # RELAUNCH: seconds before the next attempt
    device_batch_size: int | None = None  # the working value from now on, when it changed
    restarts_without_progress: int | None = None  # the new count, when it changed


def halve_batch(dbs: int) -> int:
    """The largest divisor of dbs that is at most dbs // 2 (1 at least): 8->4, 6->3, 5->1."""
    for d in range(max(1, dbs // 2), 0, -1):
        if dbs % d == 0:
            return d
    return 1


def backoff_delay(restarts: int, backoff_max: float) -> float:
    """Delay before the restart numbered `restarts` (1-based) of a streak: 0, 1, 2, 4 ... capped."""
    if restarts <= 1:
        return 0.0
    return float(min(2.0 ** (restarts - 2), backoff_max))


def working_batch_size(configured: int | None, cap: int | None) -> int | None:
    """A phase starts at min(configured, the value an earlier OOM left), or as configured."""
    if cap is None:
        return configured
    if configured is None:
        return cap
    return min(configured, cap)


def phase_batch_size(spec, index: int, working: dict) -> tuple[int | None, str | None]:
    """(the device_batch_size phase `index` starts with, a note when it reuses an earlier auto phase's).

    `working` is the job's per-phase working values (what auto-fit chose, what an OOM left). A phase
    that has one keeps it. A given number is capped by what an OOM left in an earlier phase. A phase
    with device_batch_size auto takes the nearest earlier auto phase's value when it has that phase's
    shape (model, row length, GPUs) and its total batch takes the value; else None: the trainer
    probes. An auto phase's value measures its own shape, not an OOM's cap, so it caps no later phase.
    """
    phase = spec.phases[index]
    if phase.phase in working:
        return working[phase.phase], None
    configured = phase.args.get("device_batch_size")
    if configured == "auto":
        return _reused_auto(spec, index, working)
    cap = None
    for p in spec.phases[:index]:
        used, asked = working.get(p.phase), p.args.get("device_batch_size")
        if asked == "auto":
            continue
        if isinstance(used, int) and (not isinstance(asked, int) or used < asked):
            cap = used if cap is None else min(cap, used)
    return working_batch_size(configured if isinstance(configured, int) else None, cap), None


def _reused_auto(spec, index: int, working: dict) -> tuple[int | None, str | None]:
    from daemon.preflight import phase_shape
    for j in range(index - 1, -1, -1):
        prev = spec.phases[j]
        used = working.get(prev.phase)
        if prev.args.get("device_batch_size") != "auto" or not isinstance(used, int):
            continue
        now, then = phase_shape(spec, index), phase_shape(spec, j)
        if all(now[k] == then[k] for k in ("model", "row", "ranks")) and used in now["candidates"]:
            return used, (f"{spec.phases[index].phase}: device_batch_size {used} from {prev.phase}'s auto-fit "
                          "(same model, row length and GPUs: not probed again)")
        return None, None
    return None, None


def is_stalled(*, now: float, last_activity: float, saw_step: bool, paused: bool,
               stall_timeout: float, startup_grace: float) -> bool:
    """No step line and no new checkpoint for stall_timeout (startup_grace before the first step)."""
    if paused:
        return False
    return now - last_activity > (stall_timeout if saw_step else startup_grace)


def decide(outcome: Outcome, *, phase: str, phase_index: int, n_phases: int, recovery,
           restarts_without_progress: int, progressed: bool, device_batch_size: int | None,
           exit_words: str, error: str, stopping: bool = False) -> Decision:
    """What to do after an attempt of `phase` ended with `outcome`.

    recovery: the job's spec.Recovery. device_batch_size: the value the attempt
    used (None when the trainer chose it). exit_words: "exit 1", "killed by
    signal 9". error: the last error line of the log ("" when none).
    """
    outcome = Outcome(outcome)
    said = f": {error}" if error else ""
    if outcome == Outcome.COMPLETED:
        if phase_index + 1 < n_phases:
            return Decision(Action.NEXT_PHASE, f"phase {phase} completed", "phase_done")
        return Decision(Action.DONE, f"all phases completed (last: {phase})", "done")
    if stopping:
        return Decision(Action.REQUEUE, f"interrupted by the daemon's stop during {phase}; "
                                        "resumes from its checkpoint at the next start", "interrupted")
    if outcome == Outcome.CANCELLED:
        return Decision(Action.CANCEL, f"cancelled during {phase}", "cancelled")
    if outcome == Outcome.BAD_ARGS:
        return Decision(Action.FAIL, f"{phase}: the trainer refused its arguments or data{said}", "bad_args")
    if outcome == Outcome.FAILED_TO_START:
        return Decision(Action.FAIL, f"{phase}: the trainer could not be started{said}", "failed")
    if outcome == Outcome.OOM:
        if not recovery.oom_backoff:
            return Decision(Action.FAIL, f"{phase}: out of memory and oom_backoff is off{said}", "oom")
        if device_batch_size is None:
            return Decision(Action.FAIL, f"{phase}: out of memory with an unknown device_batch_size", "oom")
        if device_batch_size <= 1:
            return Decision(Action.FAIL, f"{phase}: out of memory even at device_batch_size 1{said}", "oom")
        new = halve_batch(device_batch_size)
        return Decision(Action.RELAUNCH, f"{phase}: out of memory at device_batch_size {device_batch_size}; "
                                         f"relaunching at {new} (total batch unchanged)", "oom_backoff",
                        device_batch_size=new)
    # crashed, stalled, or interrupted by someone else: restart, within the budget
    what = {Outcome.STALLED: "stalled", Outcome.INTERRUPTED: "was interrupted"}.get(outcome, f"crashed ({exit_words})")
    count = 0 if progressed else restarts_without_progress + 1
    if count > recovery.max_restarts_without_progress:
        return Decision(Action.FAIL, f"{phase} {what} {count} times in a row without a new checkpoint; "
                                     f"giving up{said}", "gave_up", restarts_without_progress=count)
    delay = backoff_delay(max(count, 1), recovery.backoff_max)
    budget = f"restart {count}/{recovery.max_restarts_without_progress} without progress" if count else \
        "progress since the last start"
    return Decision(Action.RELAUNCH, f"{phase} {what}{said}; relaunching in {delay:g}s ({budget})",
                    "stalled" if outcome == Outcome.STALLED else "restart", delay=delay,
                    restarts_without_progress=count)
