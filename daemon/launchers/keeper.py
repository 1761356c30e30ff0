"""The keeper of a torchrun group: holds its GPU locks until the last rank is gone.

`python -m daemon.launchers.keeper [--cwd DIR] -- TORCHRUN ARGV...`, started by
the local launcher with the job's GPU lock descriptors inherited (`pass_fds`).
It exists because torchrun starts every rank in a session of its own and
without the descriptors (close_fds): a lock held by torchrun would be freed by
torchrun's death while its ranks still train, and a signal to torchrun's
process group never reaches them. So:

- the keeper holds the locks (it never closes those descriptors; they close
  when it exits) and is a child subreaper (PR_SET_CHILD_SUBREAPER): a rank
  whose torchrun dies becomes the keeper's child, not init's;
- torchrun runs as its child with PR_SET_PDEATHSIG(SIGKILL), so it cannot
  outlive the keeper either, and the built-in trainer's ranks set the same
  towards torchrun;
- when torchrun ends, whatever still runs below the keeper (orphaned ranks of a
  torchrun killed by SIGKILL) gets SIGKILL; the keeper reaps every descendant
  and only then exits, with torchrun's status (re-raising its signal), so the
  locks are free only once no rank lives;
- SIGTERM/SIGINT/SIGHUP to the keeper are passed to the ranks (SIGTERM, and
  SIGCONT so that a stopped one wakes up to save): the daemon stops a group by
  signalling its keeper, never both it and the ranks (a second SIGTERM would
  abort a rank's emergency checkpoint).

A daemon killed with SIGKILL leaves the keeper, torchrun and the ranks
running, the locks held; the next daemon adopts the keeper by pid and start
time. Only a SIGKILL of the keeper itself frees the locks early: torchrun and
the built-in ranks die with it (death signals); another trainer's ranks are
found by the group's NANOD_GROUP environment and killed by the daemon.
This module starts and reaps processes; it decides nothing about the job.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_keeper() -> None:  # runs in the child between fork and exec
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def ranks(agent_pid: int) -> list[int]:
    """The ranks: torchrun's children, or (torchrun gone) the keeper's other children."""
    from daemon import procs
    me = os.getpid()
    out = []
    for pid in procs.descendants(me):
        if pid != agent_pid and procs.parent(pid) in (agent_pid, me):
            out.append(pid)
    return out


def signal_ranks(agent_pid: int, sig: int) -> None:
    for pid in ranks(agent_pid):
        for s in (sig, signal.SIGCONT):
            try:
                os.kill(pid, s)
            except OSError:
                pass


def kill_descendants() -> None:
    from daemon import procs
    for pid in procs.descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(argv: list[str]) -> int:
    cwd = None
    if argv[:1] == ["--cwd"]:
        cwd, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("keeper: usage: python -m daemon.launchers.keeper [--cwd DIR] -- CMD...", file=sys.stderr)
        return 2
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    agent_pid = [0]
    # before torchrun exists: a stop that comes at once must not kill the keeper (and free the locks)
    forward = lambda signum, frame: signal_ranks(agent_pid[0], signal.SIGTERM)  # noqa: E731
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        agent = subprocess.Popen(argv, cwd=cwd, close_fds=True, preexec_fn=_die_with_keeper)
    except OSError as e:
        print(f"keeper: cannot start {argv[0]}: {e.strerror or e}", file=sys.stderr, flush=True)
        return 127
    agent_pid[0] = agent.pid
    status = None
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break  # no child left, so no descendant either: the locks may go
        if pid == agent.pid:
            status = st
            agent.returncode = 0  # reaped here: Popen must not wait for it again
        if status is not None:
            kill_descendants()  # torchrun is gone: nothing of its group may outlive it
    if status is None:
        return 1
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        sys.stdout.flush()
        os.kill(os.getpid(), sig)  # the daemon sees torchrun's own death, as if it were its child
        return 128 + sig
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
