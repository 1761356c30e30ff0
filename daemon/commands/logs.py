"""`nanod logs NAME [-f] [--attempt K]`: print an attempt's log (default the latest).

The trainer writes `<home>/logs/<job>/attempt-NNN.log` itself; this only reads.
With -f it follows the file as it grows and moves on to the next attempt's log
when one starts (a relaunch after a crash, OOM back-off or the next phase),
with a one-line separator, until the job is finished and its last log read, or
Ctrl-C.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

NAME = "logs"
HELP = "print an attempt's log (default the latest); -f follows it across new attempts"

POLL_S = 0.25
FINISHED = ("done", "failed", "cancelled")
_ATTEMPT_FILE = re.compile(r"^attempt-(\d{3,})\.log$")


def add_arguments(parser) -> None:
    parser.add_argument("name", metavar="NAME", help="the job")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows, across attempts")
    parser.add_argument("--attempt", type=int, metavar="K", help="attempt number (default: the latest)")


def run(args, settings) -> int:
    from daemon.cli import UserError
    from daemon.commands import job_name
    name = job_name(args.name)
    rec = load_record(settings, name)
    if rec is None and not (settings.logs_dir / name).is_dir():
        raise UserError(f"no job named {name!r} in {settings.home} (nanod list shows the jobs)")
    known = attempt_logs(settings, name, rec)
    if args.attempt is not None:
        if args.attempt not in known:
            have = f"attempts {min(known)}-{max(known)}" if known else "no attempt yet"
            raise UserError(f"job {name} has no attempt {args.attempt} ({have})")
        n = args.attempt
    elif known:
        n = max(known)
    elif args.follow:
        n = 0  # nothing yet: wait for the first attempt
    else:
        state = (rec or {}).get("state", "queued")
        print(f"job {name} has not started an attempt yet ({state})", file=sys.stderr)
        return 1
    if not args.follow:
        return print_file(known[n])
    try:
        return follow(settings, name, n, known.get(n), pinned=args.attempt is not None)
    except KeyboardInterrupt:
        return 0


def load_record(settings, name: str) -> dict | None:
    from daemon.statusview import _read_json
    return _read_json(settings.state_dir / "jobs" / f"{name}.json")


def attempt_logs(settings, name: str, rec: dict | None) -> dict[int, Path]:
    """Attempt number -> log path: the record's attempts, and any attempt-NNN.log lying there."""
    out: dict[int, Path] = {}
    try:
        for entry in os.listdir(settings.logs_dir / name):
            m = _ATTEMPT_FILE.match(entry)
            if m:
                out[int(m.group(1))] = settings.logs_dir / name / entry
    except OSError:
        pass
    for a in (rec or {}).get("attempts") or []:
        if isinstance(a, dict) and isinstance(a.get("n"), int):
            log = a.get("log") or f"logs/{name}/attempt-{a['n']:03d}.log"
            path = Path(log) if os.path.isabs(log) else settings.home / log
            out.setdefault(a["n"], path)
            if not out[a["n"]].exists():
                out[a["n"]] = path
    return out


def print_file(path: Path) -> int:
    from daemon.cli import UserError
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                sys.stdout.buffer.write(chunk)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist (deleted, or the attempt never started)") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    sys.stdout.flush()
    return 0


def follow(settings, name: str, n: int, path: Path | None, *, pinned: bool) -> int:
    """Print `path` from its start and then as it grows; switch to a newer attempt's log when it appears."""
    out = sys.stdout.buffer
    f = None
    pos = 0
    while True:
        if f is None and path is not None:
            try:
                f = open(path, "rb")
                pos = 0
            except FileNotFoundError:
                f = None
        grew = False
        if f is not None:
            try:
                size = os.fstat(f.fileno()).st_size
                if size < pos:  # truncated under us: start again
                    f.seek(0)
                    pos = 0
                chunk = f.read(1 << 16)
            except OSError:
                chunk = b""
            if chunk:
                out.write(chunk)
                out.flush()
                pos += len(chunk)
                grew = True
        if grew:
            continue  # drain before looking for a new attempt: its separator must come after this log
        rec = load_record(settings, name)
        known = attempt_logs(settings, name, rec)
        newer = [k for k in known if k > n]
        if newer and not pinned:
            n = min(newer)
            path = known[n]
            if f is not None:
                f.close()
                f = None
            out.write(_separator(rec, n).encode())
            out.flush()
            continue
        state = (rec or {}).get("state")
        if state in FINISHED and (pinned or not newer):
            if f is not None:  # the trainer's last lines may have landed after our last read
                while chunk := f.read(1 << 16):
                    out.write(chunk)
                f.close()
            out.write(f"── job {name} is {state}: {(rec or {}).get('reason') or ''} ──\n".encode())
            out.flush()
            return 0
        time.sleep(POLL_S)


def _separator(rec: dict | None, n: int) -> str:
    att = next((a for a in (rec or {}).get("attempts") or [] if isinstance(a, dict) and a.get("n") == n), {})
    bits = [f"attempt {n}"]
    if att.get("phase"):
        bits.append(str(att["phase"]))
    if att.get("resumed_from") is not None:
        bits.append(f"resumed from step {att['resumed_from']}")
    if att.get("device_batch_size") is not None:
        bits.append(f"device_batch_size {att['device_batch_size']}")
    return f"── {', '.join(bits)} ──\n"
