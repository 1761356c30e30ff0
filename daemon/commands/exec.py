"""`nanod exec [--gpu N] [--timeout S] -- CMD...`: run any command under the GPU lock.

Waits for the lock (saying once who holds it), runs CMD with the lock's
descriptor inherited, so the lock is held for exactly as long as CMD lives,
and exits with CMD's exit code (128+N when a signal N killed it). The daemon
waits meanwhile, and its job's status says who holds the GPU.
"""
from __future__ import annotations

NAME = "exec"
HELP = "run a command while holding the GPU lock (the daemon waits meanwhile)"


def add_arguments(parser) -> None:
    parser.add_argument("--gpu", type=int, default=0, help="GPU index whose lock to take (default 0)")
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
    path = settings.gpu_lock_path(args.gpu)
    try:
        fd = gpulock.acquire(path, timeout=args.timeout,
                             on_wait=lambda who: print(f"nanod exec: waiting for GPU {args.gpu}'s lock, held by {who}",
                                                       file=sys.stderr, flush=True))
    except OSError as e:
        raise UserError(f"cannot use the GPU lock {path}: {e.strerror or e}") from None
    if fd is None:
        print(f"nanod exec: timed out after {args.timeout:g}s waiting for GPU {args.gpu}'s lock, held by "
              f"{gpulock.describe_holder(path)}", file=sys.stderr)
        return 1
    try:
        try:
            child = subprocess.Popen(cmd, pass_fds=(fd,))
        except OSError as e:
            raise UserError(f"cannot run {cmd[0]}: {e.strerror or e}") from None
        gpulock.write_holder(path, pid=child.pid, command=cmd, home=None, job=None)
    finally:
        gpulock.release(fd)  # the child holds the lock now
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
