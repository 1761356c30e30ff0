"""`nanod checkpoints [NAME]`: each checkpoint of each job's phase directories.

One line per step: complete or why not, size, age, and what keeps it (protected,
newest, last-N, milestone) or that `nanod prune` would delete it. Without jobs
(or with --dir) it lists nanochat's directories under the checkpoint root.
Read-only.
"""
from __future__ import annotations

NAME = "checkpoints"
HELP = "list checkpoints: complete or not, size, age, protected"


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="only this job's directories")
    parser.add_argument("--dir", metavar="PATH", help="list this checkpoint directory")


def run(args, settings) -> int:
    import time
    from pathlib import Path

    from daemon import retention
    from daemon.cli import UserError
    from daemon.queue import list_jobs
    from daemon.units import format_duration, format_size
    from trainer import layout

    root = settings.checkpoint_root
    records = list_jobs(settings)
    protect = retention.protected_steps(root, records)
    if args.dir:
        d = Path(args.dir).expanduser()
        policies = [retention.DirPolicy(path=d, phase="?", protect=_protect_for(protect, d))]
    elif records:
        if args.name and not any(r.name == args.name for r in records):
            raise UserError(f"no job named {args.name!r}")
        policies = retention.dir_policies(root, records, only=args.name)
    else:
        if args.name:
            raise UserError(f"no job named {args.name!r}")
        policies = [retention.DirPolicy(path=d, phase=phase) for phase, sub in layout.PHASE_DIRS.items()
                    for d in sorted((root / sub).glob("*")) if d.is_dir()]
        if not policies:
            print(f"no checkpoints under {root}")
            return 0
    now = time.time()
    for pol in policies:
        jobs = f"  (job {', '.join(pol.jobs)})" if pol.jobs else ""
        print(f"{pol.path}{jobs}")
        steps = layout.list_steps(pol.path)
        if not steps:
            print("  no checkpoints")
            continue
        complete = [s for s in steps if layout.is_complete(pol.path, s, optim_ranks=pol.optim_ranks)]
        plan = None
        if pol.keep_last is not None and not pol.keep_all:
            idle = {s for s in set(steps) - set(complete)
                    if now - retention.last_modified(pol.path, s) >= retention.DEBRIS_AGE}
            plan = retention.plan_prune(complete, steps, keep_last=pol.keep_last, keep_every=pol.keep_every,
                                        protect=set(pol.protect), idle=idle)
        for step in steps:
            why_not = layout.why_incomplete(pol.path, step, optim_ranks=pol.optim_ranks)
            state = "complete" if why_not is None else f"INCOMPLETE ({why_not})"
            age = format_duration(now - retention.last_modified(pol.path, step))
            notes = []
            if step in pol.protect:
                notes.append(f"protected: {pol.protect[step]}")
            if plan is not None:
                if step in plan.delete or step in plan.debris:
                    notes.append("prune would delete")
                elif step in plan.keep and step not in pol.protect:
                    notes.append("kept: " + ", ".join(plan.keep[step]))
            size = format_size(layout.size_of(pol.path, step))
            print(f"  step {step:>7}  {state:<10}  {size:>8}  {age:>7} ago" + (f"  {'; '.join(notes)}" if notes else ""))
    return 0


def _protect_for(protect: dict, d) -> dict:
    out = {}
    for path, steps in protect.items():
        try:
            if path.resolve() == d.resolve():
                out.update(steps)
        except OSError:
            pass
    return out
