"""SIGTERM/SIGINT handling for the trainer (stdlib only, so it can be installed before torch loads).

The handler only records the signal; the training loop acts on it at the end
of the step it is in (emergency checkpoint, exit INTERRUPTED). A second signal
means "now": the process exits at once with 128+signal and saves nothing.

A second signal within SAME_STOP_SECONDS of the first is the same stop, not a
"now": one event often reaches a rank twice. SLURM ending a job signals every
process, torchrun included, which passes its own SIGTERM on to each rank a few
milliseconds later; Ctrl+C in a terminal reaches torchrun and the ranks at once,
and torchrun follows with SIGTERM. Taking that echo for "now" would throw away
the emergency checkpoint the first signal asked for.
"""
from __future__ import annotations

import os
import signal
import time

SAME_STOP_SECONDS = 1.0


class StopFlag:
    """Records SIGTERM/SIGINT for the loop; a second one (after SAME_STOP_SECONDS) ends the process on the spot."""

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0   # monotonic time of the first signal

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if now - self.at < SAME_STOP_SECONDS:
                return  # the echo of the first (torchrun passing SLURM's or the terminal's stop on)
            os.write(2, f"second signal ({signal.Signals(signum).name}): exiting now without saving\n".encode())
            os._exit(128 + signum)
        self.signum, self.at = signum, now

    def requested(self) -> bool:
        return self.signum is not None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> bool:
    """Under torchrun: this rank gets SIGKILL the moment its launcher dies (PR_SET_PDEATHSIG).

    torchrun starts each rank in a session of its own, so signals to torchrun's
    process group never reach it; without this a torchrun killed with SIGKILL
    would leave ranks training on GPUs whose locks are free. Returns False where
    it cannot be set (not Linux) or the parent is already gone, in which case the
    rank should not start at all.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return True  # not a torchrun rank: the daemon watches it directly
    parent = os.getppid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return True  # not supported: the keeper's orphan sweep still covers it
    except (OSError, AttributeError):
        return True
    # the launcher may have died between starting us and the prctl: then nobody would kill us
    return os.getppid() == parent
