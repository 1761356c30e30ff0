"""torchrun around a trainer's command: the argv, and reading back how each rank ended.

A trainer adapter builds the command of one process, `PYTHON -m MODULE ARGS`
(the built-in trainer, or a nanochat script). For a job on several GPUs it
becomes `PYTHON -m torch.distributed.run --standalone --nnodes=1
--nproc_per_node=N --max-restarts=0 -m MODULE ARGS`: the same interpreter (so
the checkout's own torch), one rank per GPU, and torchrun's own restarts off, so
that nanod stays the one supervisor. A SLURM launcher will call `wrap` with its
own rendezvous for several nodes; the local launcher calls it for one.

When a rank fails, torchrun stops the others and exits 1, whatever the rank
said. Its failure report (the "Root Cause (first observed failure)" block)
names each rank's exit code; `rank_returncode` gives the code that says what
happened (out of memory, bad arguments, a crash, an interruption), so the
trainer adapter classifies the rank's exit, not torchrun's. `trainer_output`
removes torchrun's own chatter from a log tail, so the error line is the rank's.

This module only builds argv and reads text: it starts nothing.
"""
from __future__ import annotations

import re
import signal
from dataclasses import replace

from daemon.attempt_log import last_error_line
from trainer import exitcodes

_ENTRY = "-m"
# "  exitcode  : 3 (pid: 1234)" and "  exitcode  : -15 (pid: 1234)  (SIGTERM)"
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)\s*\(pid:\s*\d+\)\s*(\(SIG\w+\))?")
_ROOT = re.compile(r"^Root Cause \(first observed failure\):")
_FAILURES = re.compile(r"^Failures:")
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
# torchrun's own log lines: "W1201 20:16:04.286000 12413 torch/distributed/elastic/... ] ..."
_AGENT_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*torch/distributed/")
_RANK_PREFIX = re.compile(r"^\[(?:default)?rank(\d+)\]:\s?")
_BANNER = ("*****************************************", "Setting OMP_NUM_THREADS environment variable")


def wrap(argv: list[str], nproc: int, *, rdzv: list[str] | None = None) -> list[str]:
    """`argv` (PYTHON -m MODULE ARGS) run as `nproc` ranks by torchrun.

    rdzv: the rendezvous flags; default one machine (--standalone --nnodes=1).
    Raises ValueError when argv is not of that form (torchrun needs a module).
    """
    if len(argv) < 3 or argv[1] != _ENTRY:
        raise ValueError(f"torchrun needs a command of the form PYTHON -m MODULE ..., not {' '.join(argv[:3])}")
    python, module, args = argv[0], argv[2], argv[3:]
    rdzv = rdzv if rdzv is not None else ["--standalone", "--nnodes=1"]
    return [python, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={nproc}", "--max-restarts=0",
            _ENTRY, module, *args]


def wrap_launch(launch, nproc: int, **kw):
    """A trainer's Launch with its argv wrapped (env and cwd as they are)."""
    return replace(launch, argv=wrap(launch.argv, nproc, **kw))


def rank_exit_codes(log_tail: str) -> tuple[int | None, list[int]]:
    """(the root cause's exit code, the other failed ranks' codes) from torchrun's failure report.

    Ranks that torchrun itself stopped with SIGTERM once another had failed are
    left out: torchrun reports them as -15 whatever they really did.
    """
    root, others, section = None, [], None
    for line in log_tail.splitlines():
        if _FAILURES.match(line):
            section = "others"
        elif _ROOT.match(line):
            section = "root"
        m = _EXITCODE.match(line)
        if m and section:
            code, sig = int(m.group(1)), m.group(2)
            if section == "root":
                root = code
            elif sig != "(SIGTERM)":
                others.append(code)
    return root, others


def rank_returncode(returncode: int | None, log_tail: str) -> int | None:
    """The exit code that says how the group ended: a rank's, when torchrun's report names one.

    Of the ranks' codes the most telling wins: out of memory (every rank backs
    off), bad arguments (retrying cannot help), a crash or a signal, and an
    interruption (the emergency checkpoint was saved by all) last.
    """
    root, others = rank_exit_codes(log_tail)
    if returncode in (None, 0) or root is None:
        return returncode
    codes = [root, *others]
    for wanted in (exitcodes.OOM, exitcodes.BAD_ARGS):
        if wanted in codes:
            return wanted
    crashes = [c for c in codes if c not in (exitcodes.OK, exitcodes.INTERRUPTED)]
    if crashes:
        return crashes[0]
    return exitcodes.INTERRUPTED if exitcodes.INTERRUPTED in codes else returncode


def trainer_output(log_tail: str) -> str:
    """The ranks' own lines of a log tail: torchrun's traceback, report and log lines dropped, and
    the "[rankN]:" prefix torch puts on a rank's traceback removed."""
    cut = log_tail.rfind("Traceback (most recent call last):")
    if cut >= 0 and any(word in log_tail[cut:] for word in ("ChildFailedError", "SignalException")):
        log_tail = log_tail[:cut]  # torchrun's own exception, then its failure report
    out = [_RANK_PREFIX.sub("", line) for line in log_tail.splitlines()
           if not _AGENT_LINE.match(line) and not line.startswith(_BANNER)]
    return "\n".join(out) + ("\n" if out else "")


def root_rank(log_tail: str) -> int | None:
    """The rank torchrun saw fail first, from its report."""
    section = None
    for line in log_tail.splitlines():
        if _ROOT.match(line):
            section = "root"
        elif section == "root" and (m := _RANK.match(line)):
            return int(m.group(1))
    return None


def error_line(log_tail: str) -> str:
    """Why the group ended: the root-cause rank's own error line when its traceback is in the tail,
    else the last error line of the ranks' output (never torchrun's generic ChildFailedError)."""
    root = root_rank(log_tail)
    code, _ = rank_exit_codes(log_tail)
    if root is not None and code is not None and code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"rank {root} was killed by signal {-code}{name}"
    if root is not None:
        own = []
        for line in log_tail.splitlines():
            m = _RANK_PREFIX.match(line)
            if m and int(m.group(1)) == root:
                own.append(line[m.end():])
        if own and (line := last_error_line("\n".join(own))):
            return line
    return last_error_line(trainer_output(log_tail))
