"""An attempt's log file: where it is, its new lines as they come, and the line that says why it ended.

Each attempt's stdout and stderr go to `<home>/logs/<job>/attempt-NNN.log`,
written by the trainer itself (never through a pipe to the daemon, so the
trainer outlives a daemon that dies). The daemon reads it back here: step lines
with an offset (a partial last line waits for its newline), and after the end
the tail, for the error: the one home of "why did it end" for every trainer
(the OOM text, the exception line of the last traceback, an argument error, or
nothing for a plain signal kill), always without terminal colour codes, since
status, events and the journal show it. This module only reads.
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

# what an out-of-memory looks like in a log, whatever the exit code says (torch, CUDA runtime, driver)
OOM_TEXTS = ("torch.OutOfMemoryError", "CUDA out of memory", "CUDA error: out of memory",
             "CUDA driver error: out of memory", "OutOfMemoryError")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_TRACEBACK = "Traceback (most recent call last):"
# lines that never say why a process ended: progress, nanod's own header, logging chatter
_CHATTER = re.compile(r"^(step |Step |# nanod:|paused:|resumed:)|^\S+ \S+ - [\w.]+ - (INFO|DEBUG) - ")
_ARG_ERROR = re.compile(r"^\S+: error: ")   # argparse, and the builtin trainer's "trainer: error: ..."
# signals that end a process from outside: they say nothing about the process itself
_PLAIN_KILLS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def strip_ansi(text: str) -> str:
    """`text` without terminal colour and cursor codes (nanochat colours its log lines)."""
    return _ANSI.sub("", text)


def log_path(settings, job: str, attempt_n: int) -> Path:
    return settings.logs_dir / job / f"attempt-{attempt_n:03d}.log"


class LogTail:
    """New complete lines of a growing file, from an offset; a partial last line waits for its newline."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset, self._partial = Path(path), offset, b""

    def read_lines(self, max_bytes: int = 1 << 20) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # truncated: start again
                    self.offset, self._partial = 0, b""
                if size == self.offset:
                    return []
                f.seek(self.offset)
                data = f.read(max_bytes)
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > max_bytes:  # a "line" that never ends: drop it
            self._partial = b""
        # a progress bar redraws with \r: the text after the last one is what the line says
        return [ln.rsplit(b"\r", 1)[-1].decode("utf-8", errors="replace") for ln in lines]


def read_tail(path: Path, nbytes: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - nbytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def last_error_line(tail: str, returncode: int | None = None) -> str:
    """The line that says why an attempt ended, from the tail of its log ("" when none does).

    In order: a line with an out-of-memory text; nothing for a process killed from
    outside (SIGKILL, SIGTERM, SIGINT, SIGHUP: its tail is whatever it was doing, e.g.
    an INFO line); the exception line of the last traceback; an argument error
    (`prog: error: ...`); else the last line that is not progress or logging chatter
    (e.g. a C++ abort's `what():` line).
    """
    lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in strip_ansi(tail or "").splitlines()]
    for line in lines:
        if any(t in line for t in OOM_TEXTS):
            return line.strip()[:300]
    if returncode is not None and -returncode in _PLAIN_KILLS:
        return ""
    if _TRACEBACK in lines:
        start = len(lines) - lines[::-1].index(_TRACEBACK)
        for line in lines[start:]:
            if line and not line[0].isspace() and not line.startswith(("During handling", "The above exception")):
                return line[:300]
    for line in reversed(lines):
        if _ARG_ERROR.match(line):
            return line[:300]
    for line in reversed(lines):
        line = line.strip()
        if line and not _CHATTER.match(line):
            return line[:300]
    return ""
