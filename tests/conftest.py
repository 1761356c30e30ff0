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


# The slowest files, started first: under `pytest -n 3` (make test) a long file picked up last
# would run alone at the end while the other worker idles. Seconds on 2 cores, measured.
SLOW_FIRST = ["test_slurm_daemon.py", "test_slurm.py", "test_nanochat_real.py", "test_drill.py",
              "test_gpus_daemon.py", "test_gpus.py", "test_daemon_e2e.py", "test_trainer_ddp.py",
              "test_bench.py", "test_daemon_recovery.py"]
# files that share one session resource run on one worker: the SLURM cluster is one per machine
SHARED_GROUPS = {"test_slurm.py": "slurm", "test_slurm_daemon.py": "slurm"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Slow files first; each file one xdist group (its module fixtures are built once, on one worker)."""
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
    for item in items:
        item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(item.path.name, item.path.name)))


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
