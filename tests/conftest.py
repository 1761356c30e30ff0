"""Shared test helpers: temporary nanod homes, checkpoint roots, wait_until."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05, message: str = ""):
    """Poll `condition` until it returns a truthy value; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message or condition}")
        time.sleep(interval)


@pytest.fixture
def nanochat_dir(tmp_path, monkeypatch) -> Path:
    """A fresh NANOCHAT_BASE_DIR for checkpoints (and the trainer's embedded data)."""
    d = tmp_path / "nanochat"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture
def nanod_home(tmp_path, monkeypatch) -> Path:
    """A fresh nanod home with its own lock dir, so tests never touch the user's."""
    home = tmp_path / "home"
    monkeypatch.setenv("NANOD_HOME", str(home))
    monkeypatch.setenv("NANOD_LOCK_DIR", str(tmp_path / "locks"))
    return home


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    # a developer's own settings must not leak into tests
    for key in list(os.environ):
        if key.startswith("NANOD_") or key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster for the session (tests/slurm_cluster.py), skipped with the reason
    when this machine cannot start one (not root, slurm-wlm/munge missing)."""
    from tests.slurm_cluster import Cluster, why_not
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = Cluster().start()
    yield cluster
    cluster.stop()
