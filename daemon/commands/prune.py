"""`nanod prune [--dry-run] [NAME]`: apply each job's keep-last-N to its checkpoint directories now.

Safe beside a running daemon and a save in progress: retention only ever
deletes complete checkpoints older than the newest complete one (and crash
debris untouched for an hour), never one a job resumes from or starts from,
nor a completed phase's final checkpoint. With `--dir PATH --keep-last N` it
prunes any nanochat checkpoint directory, with or without nanod jobs.
"""
from __future__ import annotations

NAME = "prune"
HELP = "delete old checkpoints by each job's retention (keep-last-N)"


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="only this job's directories")
    parser.add_argument("--dry-run", "-n", action="store_true", help="print what would be deleted; delete nothing")
    parser.add_argument("--dir", metavar="PATH", help="prune this checkpoint directory (needs --keep-last)")
    parser.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N complete checkpoints (N >= 2)")
    parser.add_argument("--keep-every", type=int, metavar="K", help="also keep steps that are multiples of K")
    parser.add_argument("--optim-ranks", type=int, metavar="R",
                        help="optimizer files a complete checkpoint has (0 for old nanochat chat_sft); "
                             "default: from the meta, else 1")


def run(args, settings) -> int:
    from pathlib import Path

    from daemon import retention
    from daemon.cli import UserError
    from daemon.queue import list_jobs

    if args.keep_last is not None:
        try:
            retention.check_keep_last(args.keep_last)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.keep_every is not None and args.keep_every < 1:
        raise UserError("--keep-every must be at least 1")
    root = settings.checkpoint_root
    records = list_jobs(settings)
    if args.dir:
        if args.name:
            raise UserError("give either NAME or --dir, not both")
        if args.keep_last is None:
            raise UserError("--dir needs --keep-last N")
        d = Path(args.dir).expanduser()
        if not d.is_dir():
            raise UserError(f"{d}: not a directory")
        protect = {}
        for path, steps in retention.protected_steps(root, records).items():
            if _same_dir(path, d):
                protect.update(steps)
        policies = [retention.DirPolicy(path=d, phase="?", keep_last=args.keep_last, keep_every=args.keep_every,
                                        protect=protect)]
    else:
        if not records:
            raise UserError(f"no jobs in {settings.home}; to prune any checkpoint directory, "
                            "give --dir PATH --keep-last N")
        if args.name and not any(r.name == args.name for r in records):
            raise UserError(f"no job named {args.name!r}")
        policies = retention.dir_policies(root, records, only=args.name)
        for pol in policies:
            if args.keep_last is not None:
                pol.keep_last, pol.keep_all = args.keep_last, False
            if args.keep_every is not None:
                pol.keep_every = args.keep_every
    return prune_policies(policies, dry_run=args.dry_run, optim_ranks=args.optim_ranks, root=root)


def prune_policies(policies, *, dry_run: bool, optim_ranks: int | None, root) -> int:
    import sys

    from daemon import retention
    from daemon.units import format_size
    from trainer import layout

    verb = "would delete" if dry_run else "deleted"
    total, failed = 0, False
    for pol in policies:
        where = _show(pol.path, root)
        jobs = f" (job {', '.join(pol.jobs)})" if pol.jobs else ""
        if pol.keep_all or pol.keep_last is None:
            print(f"{where}{jobs}: keeps everything (retention.keep_last is unset)")
            continue
        if not pol.path.is_dir():
            continue
        sizes = {s: layout.size_of(pol.path, s) for s in layout.list_steps(pol.path)}
        result = retention.prune_dir(pol.path, keep_last=pol.keep_last, keep_every=pol.keep_every,
                                     protect=set(pol.protect), dry_run=dry_run,
                                     optim_ranks=pol.optim_ranks if optim_ranks is None else optim_ranks)
        every = f", keep_every {pol.keep_every}" if pol.keep_every else ""
        print(f"{where}{jobs}: keep_last {pol.keep_last}{every}")
        for step in result.deleted_steps:
            debris = "  (crash leftover: incomplete, untouched for an hour)" if step in result.debris else ""
            print(f"  {verb} step {step}  {format_size(sizes.get(step, 0))}{debris}")
        for step, why in sorted(result.kept.items()):
            if retention.PROTECTED in why and step in pol.protect:
                print(f"  kept step {step}: {pol.protect[step]}")
        kept = sorted(result.kept)
        print(f"  {len(result.deleted_steps)} {'to delete' if dry_run else 'deleted'}, {len(kept)} kept"
              + (f" (newest complete: {max(s for s, w in result.kept.items() if retention.NEWEST in w)})"
                 if any(retention.NEWEST in w for w in result.kept.values()) else ""))
        for err in result.errors:
            print(f"  error: {err}", file=sys.stderr)
            failed = True
        total += result.freed_bytes
    print(f"{'would free' if dry_run else 'freed'} {format_size(total)}")
    return 1 if failed else 0


def _same_dir(a, b) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _show(path, root) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
