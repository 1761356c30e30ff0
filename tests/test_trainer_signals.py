"""Claims about the trainer's stop flag (trainer/signals.py), with real signals to a real process."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from conftest import ROOT, wait_until

# a process that installs the flag, says so, then says once that a stop was asked, and lives on
PROGRAM = """
import time
from trainer.signals import StopFlag
flag = StopFlag().install()
print("ready", flush=True)
while not flag.requested():
    time.sleep(0.02)
print("stop requested", flush=True)
while True:
    time.sleep(0.1)
"""


def start() -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", PROGRAM], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_second_signal_within_a_second_is_the_same_stop_not_an_exit():
    p = start()
    try:
        p.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        p.send_signal(signal.SIGTERM)   # torchrun passing SLURM's SIGTERM on, a few ms later
        p.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert p.poll() is None, "the echo of the first stop must not end the process"
        assert p.stdout.readline().strip() == "stop requested"
    finally:
        p.kill()
        p.wait()


def test_a_second_signal_after_the_window_exits_at_once_without_saving():
    p = start()
    try:
        p.send_signal(signal.SIGTERM)
        time.sleep(1.2)
        p.send_signal(signal.SIGTERM)
        wait_until(lambda: p.poll() is not None, 5, message="the second stop to end the process")
        assert p.returncode == 128 + signal.SIGTERM
    finally:
        p.kill()
        p.wait()
