"""SIGTERM/SIGINT handling for the trainer (stdlib only, so it can be installed before torch loads).

The handler only records the signal; the training loop acts on it at the end
of the step it is in (emergency checkpoint, exit INTERRUPTED). A second signal
means "now": the process exits at once with 128+signal and saves nothing.
"""
from __future__ import annotations

import os
import signal


class StopFlag:
    """Records SIGTERM/SIGINT for the loop; the second one ends the process on the spot."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os.write(2, f"second signal ({signal.Signals(signum).name}): exiting now without saving\n".encode())
            os._exit(128 + signum)
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None
