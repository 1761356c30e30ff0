"""Claims about the inbox: files are taken once complete, bad files are rejected, never fatal."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.inbox import Inbox, InboxError
from tests.conftest import wait_until

VALID = "phases:\n  - phase: base\n    args: {depth: 4, num_iterations: 10}\n"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", settle_time=0.2, poll_interval=0.1, rescan_interval=30)


@pytest.fixture
def make_inbox():
    made = []

    def make(settings: Settings, **kw) -> Inbox:
        inbox = Inbox(settings, threading.Event(), **kw)
        made.append(inbox)
        inbox.start()
        return inbox

    yield make
    for inbox in made:
        inbox.stop()


def take_until(inbox: Inbox, count: int = 1, timeout: float = 5.0) -> list:
    got: list = []

    def enough():
        got.extend(inbox.take())
        return len(got) >= count

    wait_until(enough, timeout, interval=0.02)
    return got


def drop(tmp_path: Path, inbox_dir: Path, name: str, text: str) -> Path:
    """Write the file outside the inbox, then rename it in (what editors and `nanod submit` do)."""
    src = tmp_path / f"src-{name}"
    src.write_text(text)
    dest = inbox_dir / name
    os.rename(src, dest)
    return dest


def test_file_renamed_in_is_taken_within_a_fraction_of_a_second(settings, make_inbox, tmp_path):
    inbox = make_inbox(settings)
    assert inbox.mode == "inotify", inbox.mode_reason
    start = time.monotonic()
    drop(tmp_path, settings.inbox_dir, "tiny.yaml", VALID)
    (result,) = take_until(inbox)
    assert time.monotonic() - start < 0.2
    assert result.error is None and result.spec.name == "tiny"


def test_world_writable_inbox_is_refused(settings):
    settings.inbox_dir.mkdir(parents=True)
    os.chmod(settings.inbox_dir, 0o777)
    with pytest.raises(InboxError, match="writable by other users"):
        Inbox(settings, threading.Event()).start()
