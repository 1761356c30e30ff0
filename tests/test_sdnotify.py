"""systemd notify: real AF_UNIX datagram sockets, as systemd would listen."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest

from daemon.sdnotify import SystemdNotifier


@pytest.fixture
def listener():
    # a short directory: AF_UNIX paths are limited to ~108 bytes
    d = tempfile.mkdtemp(prefix="nd-")
    path = os.path.join(d, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()
    shutil.rmtree(d, ignore_errors=True)


def receive_all(sock) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_messages_arrive_in_order_with_rate_limited_watchdog(listener):
    path, sock = listener
    clock = FakeClock()
    n = SystemdNotifier(path, watchdog_usec=10_000_000, clock=clock)  # WatchdogSec=10s
    assert n.enabled and n.watchdog_due()
    assert n.ready(status="idle")
    assert n.watchdog() is True          # first ping goes at once
    assert n.watchdog() is False         # then not before half the interval
    clock.t += 4.9
    assert n.watchdog() is False and not n.watchdog_due()
    clock.t += 0.2
    assert n.watchdog() is True
    assert n.status("training d8\nbase step 250/3520")
    assert n.stopping()
    assert receive_all(sock) == ["READY=1\nSTATUS=idle", "WATCHDOG=1", "WATCHDOG=1",
                                 "STATUS=training d8 base step 250/3520", "STOPPING=1"]
    n.close()


def test_from_env_reads_socket_and_watchdog_for_our_pid(listener):
    path, sock = listener
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 2.0
    assert n.watchdog()
    assert sock.recv(100) == b"WATCHDOG=1"


def test_watchdog_pid_of_another_process_sends_no_pings(listener):
    path, sock = listener
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert not n.watchdog_due()
    assert n.watchdog() is False
    n.ready()  # other messages still go
    assert receive_all(sock) == ["READY=1"]


def test_abstract_socket_address_is_reached():
    name = f"nanod-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        n = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_unset_notify_socket_is_a_no_op():
    n = SystemdNotifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert not n.watchdog_due()
    assert n.ready() is False and n.status("x") is False and n.watchdog() is False and n.stopping() is False


def test_from_env_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not SystemdNotifier.from_env().enabled


def test_send_to_a_vanished_socket_never_raises(tmp_path, caplog):
    n = SystemdNotifier(str(tmp_path / "gone.sock"), watchdog_usec=1000)
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.status("still fine") is False
    assert sum("notify" in r.getMessage() for r in caplog.records if r.levelname == "WARNING") == 1
