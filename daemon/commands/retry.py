"""`nanod retry NAME`: requeue a failed or cancelled job; it resumes from its last checkpoint with a fresh restart budget."""
from __future__ import annotations

NAME = "retry"
HELP = "requeue a failed or cancelled job from its last checkpoint"


def add_arguments(parser) -> None:
    parser.add_argument("name", help="the job's name")


def run(args, settings) -> int:
    from daemon.cli import UserError
    from daemon.loop import change_job
    try:
        print(change_job(settings, "retry", args.name))
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0
