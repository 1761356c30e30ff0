"""One module per `nanod` command (see daemon/cli.py), and what several of them share."""
from __future__ import annotations


def job_name(name: str) -> str:
    """A command's NAME argument, checked as job names are everywhere (spec.check_name: a name
    becomes a path); a UserError in one line otherwise."""
    from daemon.cli import UserError
    from daemon.spec import check_name
    try:
        return check_name(name, "job name")
    except ValueError:
        raise UserError(f"{name!r} is not a job name (names match [a-z0-9][a-z0-9._-]{{0,63}})") from None
