"""`nanod exec [--gpu N[,M...]] [--timeout S] -- CMD...`: run any command under the GPU locks.

Waits for the locks (saying once who holds one), runs CMD with their
descriptors inherited, so they are held for exactly as long as CMD lives,
and exits with CMD's exit code (128+N when a signal N killed it). The daemon
waits meanwhile, and its job's status says who holds the GPU. Several GPUs
are taken in index order, all or none at each try (daemon/gpu/lock.py), so
exec never holds one while it waits for another; a job on several GPUs holds
each of them, so exec on any one of them waits for the whole job.
"""
from __future__ import annotations

NAME = "exec"
HELP = "run a command while holding the GPU lock (the daemon waits meanwhile)"


def add_arguments(parser) -> None:
    parser.add_argument("--gpu", type=_gpu_list, default=[0], metavar="N[,M...]",
                        help="GPU index(es) whose locks to take (default 0; e.g. 0,1 for two)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="give up after waiting S seconds for the lock (exit 1)")
    parser.add_argument("cmd", nargs="+", metavar="-- CMD", help="the command and its arguments")


def run(args, settings) -> int:
    import signal
    import subprocess
    import sys

    from daemon.cli import UserError
    from daemon.gpu import lock as gpulock

    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        raise UserError("give a command after --, e.g. nanod exec -- nvidia-smi")
    gpus = sorted(args.gpu)
    paths = [settings.gpu_lock_path(g) for g in gpus]
    gpu_of = dict(zip(paths, gpus))
    try:
        fds = gpulock.acquire_all(paths, timeout=args.timeout, on_wait=lambda path, who: print(
            f"nanod exec: waiting for GPU {gpu_of[path]}'s lock, held by {who}", file=sys.stderr, flush=True))
    except OSError as e:
        raise UserError(f"cannot use the GPU lock {e.filename or paths[0]}: {e.strerror or e}") from None
    if fds is None:
        held = next((p for p in paths if gpulock.is_held(p)), paths[0])
        print(f"nanod exec: timed out after {args.timeout:g}s waiting for GPU {gpu_of[held]}'s lock, held by "
              f"{gpulock.describe_holder(held)}", file=sys.stderr)
        return 1
    try:
        try:
            child = subprocess.Popen(cmd, pass_fds=tuple(fds))
        except OSError as e:
            raise UserError(f"cannot run {cmd[0]}: {e.strerror or e}") from None
        for path in paths:
            gpulock.write_holder(path, pid=child.pid, command=cmd, home=None, job=None)
    finally:
        gpulock.release_all(fds)  # the child holds the locks now
    # pass a stop on to the command, then wait for it like a shell would
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:  # the child got the same SIGINT from the terminal
            continue
    return 128 - code if code < 0 else code


def _gpu_list(text: str) -> list[int]:
    import argparse
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU indices are numbers, e.g. 0 or 0,1") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r}: each GPU index once, none negative")
    return gpus
