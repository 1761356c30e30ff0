"""`nanod cancel NAME`: stop a job gracefully (its trainer saves first) and mark it cancelled."""
from __future__ import annotations

NAME = "cancel"
HELP = "stop a job gracefully and mark it cancelled"


def add_arguments(parser) -> None:
    parser.add_argument("name", help="the job's name")


def run(args, settings) -> int:
    from daemon.cli import UserError
    from daemon.loop import change_job
    try:
        print(change_job(settings, "cancel", args.name))
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0
