"""`nanod submit FILE`: validate a job file, then copy it atomically into the inbox."""
from __future__ import annotations

NAME = "submit"
HELP = "validate a job file and drop it into the inbox"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="the job file (YAML)")


def run(args, settings) -> int:
    from pathlib import Path

    from daemon.atomic import write_bytes_atomic
    from daemon.cli import UserError
    from daemon.queue import load_job
    from daemon.spec import JobFileError, load_job_file
    from daemon.trainers import check_job

    src = Path(args.file)
    try:
        spec = load_job_file(src)
        check_job(spec, settings)  # the inbox would refuse it: say so now, with the same reason
    except (JobFileError, ValueError, OSError) as e:
        raise UserError(str(e)) from None
    old = load_job(settings, spec.name)
    if old is not None and not old.finished:
        raise UserError(f"a job named {spec.name!r} is already {old.state.value}; cancel it or choose another name")
    inbox = settings.inbox_dir
    inbox.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = src.name if src.suffix.lower() in (".yaml", ".yml") else f"{spec.name}.yaml"
    dest = inbox / name
    if dest.exists():
        raise UserError(f"{dest} already exists in the inbox (not yet taken by the daemon)")
    write_bytes_atomic(dest, src.read_bytes())  # hidden temp name, then rename: the inbox never sees half a file
    from daemon.loop import daemon_running
    tail = "" if daemon_running(settings) else " (no daemon is running on this home: start one with `nanod run`)"
    print(f"submitted job {spec.name} to {dest}{tail}")
    return 0
