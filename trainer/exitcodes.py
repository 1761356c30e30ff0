"""The trainer's exit codes: the one place they are defined (stdlib only).

The daemon reads them to decide what to do after an attempt ends; a person reads
them in docs/architecture.md and the README. Anything not listed is a crash
(Python's uncaught exception is 1; death by signal shows as a negative code).
"""

OK = 0            # the phase completed and its final checkpoint is saved
BAD_ARGS = 2      # bad flags, missing/unusable data, mismatched resume: do not retry
OOM = 3           # out of memory (torch.OutOfMemoryError); memory released first
INTERRUPTED = 4   # SIGTERM/SIGINT: emergency checkpoint saved at the current step

NAMES = {OK: "completed", BAD_ARGS: "bad arguments", OOM: "out of memory", INTERRUPTED: "interrupted"}


def describe(code: int) -> str:
    """A few words for an exit code, e.g. for status and logs."""
    if code in NAMES:
        return NAMES[code]
    if code < 0:
        return f"killed by signal {-code}"
    return f"crashed (exit {code})"
