"""`nanod run`: the daemon, in the foreground (systemd runs it as a user service)."""
from __future__ import annotations

NAME = "run"
HELP = "run the daemon in the foreground: watch the inbox, run the queue, recover from failures"


def add_arguments(parser) -> None:
    pass


def run(args, settings) -> int:
    import logging

    from daemon.cli import UserError
    from daemon.inbox import InboxError
    from daemon.loop import DaemonBusy, run_daemon
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    try:
        return run_daemon(settings)
    except (DaemonBusy, InboxError) as e:
        raise UserError(str(e)) from None
