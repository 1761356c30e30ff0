"""`nanod check FILE`: the training safety guide's checklist for a job file, before it runs.

One line per check (OK / WARN / FAIL). Exit 1 when any check FAILs, 2 when the
file is not a valid job, 0 otherwise. Memory and disk needs are estimates
(daemon/preflight.py says how they are made).
"""
from __future__ import annotations

NAME = "check"
HELP = "run the preflight checklist on a job file (GPU memory, disk, save_every, ...)"


def add_arguments(parser) -> None:
    parser.add_argument("file", metavar="FILE", help="a job file (YAML)")


def run(args, settings) -> int:
    from pathlib import Path

    from daemon.cli import UserError
    from daemon.preflight import FAIL, check_job
    from daemon.spec import JobFileError, load_job_file

    try:
        spec = load_job_file(Path(args.file))
    except JobFileError as e:
        raise UserError(str(e)) from None
    checks = check_job(settings, spec)
    for c in checks:
        print(c.line())
    failed = sum(c.level == FAIL for c in checks)
    warned = sum(c.level == "WARN" for c in checks)
    print(f"{spec.name}: {failed} failed, {warned} warnings, {len(checks) - failed - warned} ok")
    return 1 if failed else 0
