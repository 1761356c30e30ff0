"""An attempt's log file: where it is, its new lines as they come, and the line that says why it ended.

Each attempt's stdout and stderr go to `<home>/logs/<job>/attempt-NNN.log`,
written by the trainer itself (never through a pipe to the daemon, so the
trainer outlives a daemon that dies). The daemon reads it back here: step lines
with an offset (a partial last line waits for its newline), and after the end
the tail, for the error. This module only reads.
"""
from __future__ import annotations

import os
from pathlib import Path


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


def last_error_line(tail: str) -> str:
    """The line that best says why an attempt ended: the last one that is not progress chatter."""
    for line in reversed(tail.splitlines()):
        line = line.rsplit("\r", 1)[-1].strip()
        if line and not line.startswith(("step ", "# nanod:", "paused:", "resumed:")):
            return line[:300]
    return ""
