"""systemd's notify protocol (sd_notify) without the systemd library.

Under `Type=notify` systemd passes NOTIFY_SOCKET (a path, or '@name' for an
abstract socket); one datagram of `KEY=value` lines per message tells it that
the daemon is ready (READY=1), what it is doing (STATUS=...), that it is still
alive (WATCHDOG=1, when the unit has WatchdogSec= and so WATCHDOG_USEC is set)
and that it is stopping (STOPPING=1).

Watchdog pings must come from the daemon's main loop, never from a side thread:
a thread would go on pinging while the loop itself is deadlocked, and the
watchdog would never fire. `watchdog()` rate-limits itself to one ping per half
of WATCHDOG_USEC, so the loop may call it on every tick.

Without NOTIFY_SOCKET every method is a no-op. Sending never raises: a failure
is logged once (systemd may have gone away; the daemon must go on training).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Mapping

log = logging.getLogger("nanod.sdnotify")


class SystemdNotifier:
    def __init__(self, address: str | None, *, watchdog_usec: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.address = address or None               # as in NOTIFY_SOCKET: a path or "@abstract"
        self.watchdog_interval = (watchdog_usec / 1e6) if watchdog_usec and self.address else None
        self._clock = clock
        self._last_ping: float | None = None
        self._sock: socket.socket | None = None
        self._failed_once = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SystemdNotifier":
        """A SystemdNotifier from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID.

        WATCHDOG_PID names the process systemd expects pings from: when it is
        set and is not us (e.g. we are a child that inherited the variables),
        the watchdog is off.
        """
        env = os.environ if environ is None else environ
        usec = _positive_int(env.get("WATCHDOG_USEC"))
        wpid = env.get("WATCHDOG_PID")
        if wpid is not None and _positive_int(wpid) != os.getpid():
            usec = None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # ---- messages ----------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"] + ([_status_line(status)] if status else [])
        return self.send(*lines)

    def status(self, text: str) -> bool:
        return self.send(_status_line(text))

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"] + ([_status_line(status)] if status else [])
        return self.send(*lines)

    def watchdog_due(self) -> bool:
        """True when a WATCHDOG=1 ping is wanted now (half the interval has passed)."""
        if self.watchdog_interval is None:
            return False
        return self._last_ping is None or self._clock() - self._last_ping >= self.watchdog_interval / 2

    def watchdog(self) -> bool:
        """Ping the watchdog if due; cheap to call on every tick. True when a ping was sent."""
        if not self.watchdog_due():
            return False
        self._last_ping = self._clock()
        return self.send("WATCHDOG=1")

    def send(self, *lines: str) -> bool:
        """One datagram of KEY=value lines. Never raises; False when not sent."""
        if not self.enabled or not lines:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # not inherited by children
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), _sockaddr(self.address))
            return True
        except (OSError, ValueError) as e:
            if not self._failed_once:
                self._failed_once = True
                log.warning("systemd notify to %s failed: %s (further failures are not logged)", self.address, e)
            else:
                log.debug("systemd notify failed: %s", e)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _sockaddr(address: str) -> str | bytes:
    # '@name' is Linux's abstract namespace: a leading NUL byte, no file on disk
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _status_line(text: str) -> str:
    # a status is one line: a newline would start a new KEY=value assignment
    return "STATUS=" + " ".join(str(text).split())


def _positive_int(value: str | None) -> int | None:
    try:
        n = int(value) if value is not None else None
    except ValueError:
        return None
    return n if n and n > 0 else None
