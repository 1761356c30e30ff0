"""Keep-last-N for checkpoint directories: the only code that deletes checkpoints.

Policy (`plan_prune`, pure) is apart from storage (`prune_dir`). A checkpoint
(model + meta + each rank's optim) is one unit, and "complete" means only what
`trainer.layout.is_complete` says: the same test resume uses.

Rules (promise 10):
- keep_last < 2 is refused: the newest checkpoint may still be being written.
- Only complete checkpoints are counted and deleted. The newest complete one,
  the last `keep_last` complete ones, milestones (multiples of keep_every) and
  `protect`ed steps (being resumed from, a later phase's init_from, each
  completed phase's final checkpoint) are kept.
- An incomplete checkpoint newer than the newest complete one may be being
  written: never touched.
- Debris: an incomplete checkpoint *older* than the newest complete one is a
  leftover of a crash mid-save (resume skipped it, so nothing will finish it).
  It is deleted only when none of its files (nor a temp file of its step) has
  been modified for `debris_age` (1 h): a trainer restarted from scratch in the
  same directory could otherwise be writing it right now.
- Deletion removes the meta first (the completeness marker) and fsyncs the
  directory, then the optimizer and model files: a deletion cut short leaves
  an incomplete checkpoint that nothing resumes from, never a "complete" one
  missing its weights.
- Hidden temp files (layout.is_temp) and stray files such as
  model_000200_backup.pt are never touched. Deletion failures are returned and
  logged, never raised.

`prune_job` is the daemon's one entry (attempts.py calls it on a new
checkpoint, at the end of every attempt and at daemon start); `nanod prune`
applies the same `dir_policies` by hand.

Safe beside a running save without a lock: a save only ever creates a step
newer than the newest complete one, which is never deleted.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from daemon.atomic import fsync_dir
from trainer import layout

log = logging.getLogger("nanod.retention")

DEBRIS_AGE = 3600.0  # seconds untouched before an old incomplete checkpoint counts as crash debris

# reasons a checkpoint is kept
NEWEST = "newest"
LAST_N = "last-N"
MILESTONE = "milestone"
PROTECTED = "protected"
BEING_WRITTEN = "incomplete, newer than the newest complete (may be being written)"
RECENT_INCOMPLETE = "incomplete, modified recently"


@dataclass(frozen=True)
class PrunePlan:
    delete: list[int]                      # complete checkpoints to delete, ascending
    debris: list[int]                      # old incomplete checkpoints to delete, ascending
    keep: dict[int, tuple[str, ...]]       # every other step -> why it is kept


@dataclass
class PruneResult:
    deleted_steps: list[int] = field(default_factory=list)   # deleted (or, dry run, to delete), debris included
    freed_bytes: int = 0
    kept: dict[int, tuple[str, ...]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)         # one line per file that could not be deleted
    debris: list[int] = field(default_factory=list)         # the subset of deleted_steps that was incomplete
    dry_run: bool = False


def check_keep_last(keep_last: int | None) -> None:
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 2):
        raise ValueError(f"keep_last must be at least 2, got {keep_last!r}: "
                         "the newest checkpoint may still be being written, so one more must be kept")


def plan_prune(steps_complete: Iterable[int], steps_all: Iterable[int], *, keep_last: int | None,
               keep_every: int | None = None, protect: Iterable[int] = frozenset(),
               idle: Iterable[int] = frozenset()) -> PrunePlan:
    """Which steps to delete and why each other one is kept.

    steps_all: every step with any file; steps_complete: those layout.is_complete
    accepts. idle: incomplete steps untouched for the debris age (the storage
    side measures it). keep_last None keeps everything.
    """
    check_keep_last(keep_last)
    if keep_every is not None and keep_every < 1:
        raise ValueError(f"keep_every must be at least 1, got {keep_every!r}")
    complete = sorted(set(steps_complete))
    protect, idle = set(protect), set(idle)
    newest = complete[-1] if complete else None
    last_n = set(complete if keep_last is None else complete[-keep_last:])
    keep: dict[int, tuple[str, ...]] = {}
    delete: list[int] = []
    for step in complete:
        why = []
        if step == newest:
            why.append(NEWEST)
        if step in last_n:
            why.append(LAST_N if keep_last is not None else "keep_last unset (keep all)")
        if keep_every and step % keep_every == 0:
            why.append(MILESTONE)
        if step in protect:
            why.append(PROTECTED)
        if why:
            keep[step] = tuple(why)
        else:
            delete.append(step)
    debris: list[int] = []
    for step in sorted(set(steps_all) - set(complete)):
        if newest is None or step > newest:
            keep[step] = (BEING_WRITTEN,)
        elif step in protect:
            keep[step] = (PROTECTED,)
        elif step in idle and keep_last is not None:
            debris.append(step)
        else:
            keep[step] = (RECENT_INCOMPLETE,)
    return PrunePlan(delete=delete, debris=debris, keep=keep)


def prune_dir(ckpt_dir: Path, *, keep_last: int | None, keep_every: int | None = None,
              protect: Iterable[int] = frozenset(), dry_run: bool = False, optim_ranks: int | None = None,
              debris_age: float = DEBRIS_AGE, now: float | None = None,
              unlink: Callable[[Path], None] = os.unlink) -> PruneResult:
    """Apply the keep-last-N policy to one checkpoint directory. Never raises for a failed deletion.

    optim_ranks is passed to layout.is_complete (0 for old nanochat chat_sft,
    which saves no optimizer). unlink is injectable so tests can watch the order.
    """
    ckpt_dir = Path(ckpt_dir)
    check_keep_last(keep_last)
    steps = layout.list_steps(ckpt_dir)
    complete = [s for s in steps if layout.is_complete(ckpt_dir, s, optim_ranks=optim_ranks)]
    now = time.time() if now is None else now
    idle = {s for s in set(steps) - set(complete) if now - last_modified(ckpt_dir, s) >= debris_age}
    plan = plan_prune(complete, steps, keep_last=keep_last, keep_every=keep_every, protect=protect, idle=idle)
    result = PruneResult(kept=dict(plan.keep), dry_run=dry_run)
    for step in plan.delete + plan.debris:
        if step in plan.debris:
            # checked again just before: a file touched since the plan means someone is writing it
            if now - last_modified(ckpt_dir, step) < debris_age or layout.is_complete(ckpt_dir, step, optim_ranks=optim_ranks):
                result.kept[step] = (RECENT_INCOMPLETE,)
                continue
        freed, errors = delete_checkpoint(ckpt_dir, step, dry_run=dry_run, unlink=unlink)
        result.freed_bytes += freed
        result.errors.extend(errors)
        result.deleted_steps.append(step)
        if step in plan.debris:
            result.debris.append(step)
    result.deleted_steps.sort()
    return result


def delete_checkpoint(ckpt_dir: Path, step: int, *, dry_run: bool = False,
                      unlink: Callable[[Path], None] = os.unlink) -> tuple[int, list[str]]:
    """Delete one checkpoint, meta first. Returns (bytes freed, error lines)."""
    files = layout.files_of(ckpt_dir, step)
    meta = layout.meta_path(ckpt_dir, step)
    # meta, then the optimizer files, then the model: the weights go last
    order = sorted(files, key=lambda p: (p != meta, p.name.startswith("model_"), p.name))
    freed, errors = 0, []
    for i, path in enumerate(order):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        except OSError:
            size = 0
        if dry_run:
            freed += size
            continue
        try:
            unlink(path)
            freed += size
        except FileNotFoundError:
            pass
        except OSError as e:
            msg = f"{path}: cannot delete: {e.strerror or e}"
            log.warning("retention: %s", msg)
            errors.append(msg)
            if path == meta:
                # the checkpoint is still complete: deleting its weights would tear it
                msg = f"{ckpt_dir.name} step {step}: left whole because its meta could not be deleted"
                errors.append(msg)
                return freed, errors
        if path == meta and i == 0:
            fsync_dir(ckpt_dir)  # the marker is gone on disk before any weights are
    return freed, errors


def last_modified(ckpt_dir: Path, step: int) -> float:
    """Newest mtime among a step's files and any temp file being written for it."""
    names = [p.name for p in layout.files_of(ckpt_dir, step)]
    tag = f"_{step:06d}"
    try:
        names += [n for n in os.listdir(ckpt_dir) if layout.is_temp(Path(n)) and tag in n]
    except OSError:
        pass
    newest = 0.0
    for n in names:
        try:
            newest = max(newest, os.stat(Path(ckpt_dir) / n).st_mtime)
        except OSError:
            pass
    return newest


# ---- which directories a job owns, and what in them must stay ------------------------------

@dataclass
class DirPolicy:
    """One checkpoint directory with the retention that applies to it (merged over the jobs that use it)."""

    path: Path
    phase: str
    jobs: list[str] = field(default_factory=list)
    keep_last: int | None = None
    keep_every: int | None = None
    protect: dict[int, str] = field(default_factory=dict)  # step -> why (one line)
    keep_all: bool = False                                 # some job using it has keep_last unset
    optim_ranks: int | None = None                         # for layout.is_complete; None: from the meta


def job_optim_ranks(record, phase: str) -> int | None:
    """The optimizer files a complete checkpoint of this job's phase has, as its trainer says
    (a nanochat checkout's chat_sft may save none); None lets the meta decide."""
    rec = _as_dict(record)
    if (rec.get("spec") or {}).get("runner") != "nanochat":
        return None
    try:
        from daemon.spec import JobSpec
        from daemon.trainers.nanochat import NanochatTrainer
        return NanochatTrainer(None, JobSpec.model_validate(rec["spec"])).optim_ranks(phase)
    except Exception:
        return None


def _as_dict(record) -> dict:
    return record.to_dict() if hasattr(record, "to_dict") else dict(record)


def job_dirs(root: Path, record) -> list[tuple[str, Path]]:
    """(phase, checkpoint dir) for each phase of a job record's plan."""
    from daemon.spec import JobSpec
    rec = _as_dict(record)
    spec = rec.get("spec") or {}
    try:
        tag = JobSpec.model_validate(spec).resolved_model_tag
    except Exception:
        tag = spec.get("model_tag") if isinstance(spec.get("model_tag"), str) else None
    if not tag:
        return []
    out = []
    for p in spec.get("phases") or []:
        if isinstance(p, dict) and p.get("phase") in layout.PHASE_DIRS:
            # a phase's own model_tag flag moves its folder, as the launch does (attempts.py)
            own = (p.get("args") or {}).get("model_tag")
            out.append((p["phase"], layout.checkpoint_dir(root, p["phase"], str(own or tag))))
    return out


def protected_steps(root: Path, records) -> dict[Path, dict[int, str]]:
    """Steps no prune may delete, per directory, over all job records: the final
    checkpoint of each completed phase, the live attempt's resumed_from, and the
    unfinished job's init_from (in every directory it may come from)."""
    out: dict[Path, dict[int, str]] = {}
    for record in records:
        rec = _as_dict(record)
        dirs = dict(job_dirs(root, rec))
        name = rec.get("name", "?")
        for phase, step in (rec.get("phase_final_steps") or {}).items():
            if phase in dirs and isinstance(step, int):
                out.setdefault(dirs[phase], {})[step] = f"final checkpoint of {name}'s {phase} phase"
        attempts = rec.get("attempts") or []
        att = attempts[-1] if attempts and isinstance(attempts[-1], dict) else None
        if att and rec.get("state") not in ("done", "failed", "cancelled"):
            phase = att.get("phase")
            # only while that attempt lives: the next one resumes from the newest, which is always kept
            if isinstance(att.get("resumed_from"), int) and phase in dirs and att.get("ended_at") is None:
                out.setdefault(dirs[phase], {})[att["resumed_from"]] = f"{name} attempt {att.get('n')} resumed from it"
            if isinstance(att.get("init_from"), int):
                for prev in layout.PREVIOUS_PHASES.get(phase, ()):
                    d = dirs.get(prev) or _tag_dir(root, prev, dirs)
                    if d:
                        out.setdefault(d, {}).setdefault(att["init_from"], f"{name}'s {phase} phase starts from it")
    return out


def _tag_dir(root: Path, phase: str, dirs: dict[str, Path]) -> Path | None:
    # a plan without that phase still starts from its checkpoints under the same model_tag
    any_dir = next(iter(dirs.values()), None)
    return layout.checkpoint_dir(root, phase, any_dir.name) if any_dir is not None else None


def dir_policies(root: Path, records, only: str | None = None) -> list[DirPolicy]:
    """The checkpoint directories of the jobs (or of job `only`), each with merged retention:
    the largest keep_last, the gcd of keep_every (a superset of every job's milestones),
    and the protected steps of all jobs."""
    from math import gcd
    records = [_as_dict(r) for r in records]
    protect = protected_steps(root, records)
    policies: dict[Path, DirPolicy] = {}
    everies: dict[Path, list[int]] = {}
    for rec in records:
        ret = (rec.get("spec") or {}).get("retention") or {}
        keep_last = ret.get("keep_last", 3)
        for phase, d in job_dirs(root, rec):
            pol = policies.get(d)
            if pol is None:
                pol = policies[d] = DirPolicy(path=d, phase=phase, protect=dict(protect.get(d, {})),
                                              optim_ranks=job_optim_ranks(rec, phase))
            pol.jobs.append(rec.get("name", "?"))
            if keep_last is None:
                pol.keep_all = True
            else:
                pol.keep_last = max(pol.keep_last or 0, keep_last)
            if ret.get("keep_every"):
                everies.setdefault(d, []).append(ret["keep_every"])
    for d, pol in policies.items():
        if everies.get(d):
            g = 0
            for e in everies[d]:
                g = gcd(g, e)
            pol.keep_every = g
    out = list(policies.values())
    if only is not None:
        out = [p for p in out if only in p.jobs]
    return out


# ---- the daemon's one entry: hold keep_last in one job's folders now -----------------------

def prune_job(root: Path, records, name: str, *, phases: Iterable[str] | None = None,
              ) -> list[tuple[DirPolicy, PruneResult]]:
    """Apply retention now to job `name`'s checkpoint folders (only those of `phases` when given).

    The daemon calls this whenever a user could look: a live attempt's new
    checkpoint, the end of every attempt (a phase's completion included) and,
    at its start, the folders of unfinished jobs. Policy and protections are
    dir_policies' over all `records` (the same as `nanod prune`), so a folder
    shared with another job keeps what that job needs. Folders whose
    retention keeps everything are skipped. Nothing is raised: a failure is
    one line in the result's errors.
    """
    records = [_as_dict(r) for r in records]
    wanted = None if phases is None else set(phases)
    out: list[tuple[DirPolicy, PruneResult]] = []
    try:
        policies = dir_policies(root, records, only=name)
    except Exception as e:  # a record too damaged to read must not stop the daemon
        log.exception("retention: cannot plan %s", name)
        return [(DirPolicy(path=Path(root), phase="?", jobs=[name]), PruneResult(errors=[f"{name}: {e}"]))]
    for pol in policies:
        if (wanted is not None and pol.phase not in wanted) or pol.keep_all or pol.keep_last is None:
            continue
        try:
            res = prune_dir(pol.path, keep_last=pol.keep_last, keep_every=pol.keep_every,
                            protect=set(pol.protect), optim_ranks=pol.optim_ranks)
        except Exception as e:  # e.g. a folder that cannot be listed: logged, never fatal
            log.exception("retention: failed in %s", pol.path)
            res = PruneResult(errors=[f"{pol.path}: {e}"])
        out.append((pol, res))
    return out
