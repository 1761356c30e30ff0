"""Health snapshots on this (GPU-less) host: real disk, real /proc, real scheduler."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from daemon import health, procs
from daemon.atomic import write_json_atomic
from daemon.config import load_settings
from daemon.queue import Attempt, JobRecord, JobState

from conftest import wait_until


@pytest.fixture
def settings(tmp_path):
    return load_settings(tmp_path / "home", nanochat_base_dir=tmp_path / "nanochat" / "not" / "yet")


def test_snapshot_on_this_host_says_no_gpu_and_reads_real_disk_and_ram(settings, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    snap = health.take_snapshot(settings)
    assert snap["errors"] == {}
    if snap["gpu"]["source"] == "none":
        assert snap["gpu"]["note"].startswith("no NVIDIA GPU found")
    for key in ("checkpoints", "home"):
        d = snap["disk"][key]
        assert 0 < d["free_bytes"] <= d["total_bytes"]
    # the checkpoint root does not exist yet: its nearest existing parent is measured
    assert settings.checkpoint_root.as_posix().startswith(snap["disk"]["checkpoints"]["path"])
    assert 0 < snap["ram"]["available_bytes"] <= snap["ram"]["total_bytes"]
    assert snap["trainer"] is None
    assert abs(snap["time"] - time.time()) < 60
    json.dumps(snap)  # serialisable as is


def test_one_failing_metric_keeps_the_others(settings, monkeypatch):
    def broken(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(health, "read_meminfo", broken)
    monkeypatch.setattr("daemon.gpu.vram.read_gpus", lambda: 1 / 0)
    snap = health.take_snapshot(settings)
    assert snap["ram"] is None and "no /proc here" in snap["errors"]["ram"]
    assert "ZeroDivisionError" in snap["errors"]["gpu"]
    assert snap["disk"]["home"]["free_bytes"] > 0


def write_running_job(settings, pid, pgid, peak=3.25):
    start = procs.start_ticks(pid)
    rec = JobRecord(name="d8", seq=1, spec={"name": "d8", "phases": [{"phase": "base"}]}, state=JobState.RUNNING,
                    attempts=[Attempt(n=1, phase="base", pid=pid, pgid=pgid, proc_start=int(start))],
                    progress={"phase": "base", "step": 3, "peak_mem_gib": peak})
    (settings.state_dir / "jobs").mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings.state_dir / "jobs" / "d8.json", rec.to_dict())


def test_trainer_rss_is_summed_over_its_process_group(settings):
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        wait_until(lambda: len(procs.group_pids(proc.pid)) >= 3, message="the group's children")
        write_running_job(settings, proc.pid, proc.pid)
        t = health.take_snapshot(settings)["trainer"]
        assert t["job"] == "d8" and t["pid"] == proc.pid and t["peak_mem_gib"] == 3.25
        assert t["processes"] >= 3
        assert t["rss_bytes"] >= sum(procs.rss(p) or 0 for p in [proc.pid])
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_a_dead_trainer_reports_no_rss(settings):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    write_running_job(settings, proc.pid, proc.pid)
    proc.kill()
    proc.wait()
    t = health.take_snapshot(settings)["trainer"]
    assert t["rss_bytes"] is None and t["peak_mem_gib"] == 3.25


def test_latest_and_history_are_readable_without_the_daemon(settings):
    assert health.read_latest(settings) is None and health.read_history(settings) == []
    for i in range(3):
        health.append_snapshot(settings, {"time": 1000.0 + i, "warnings": [], "i": i})
    assert health.read_latest(settings)["i"] == 2
    assert [s["i"] for s in health.read_history(settings)] == [0, 1, 2]
    assert [s["i"] for s in health.read_history(settings, since=1001.0)] == [1, 2]
    assert oct(os.stat(settings.health_dir / "latest.json").st_mode & 0o777) == "0o600"


def test_history_is_bounded_to_about_health_history(tmp_path):
    s = load_settings(tmp_path / "home", health_history=600)  # 12 segments would be 50 s: 60 s minimum
    t0 = 1_000_000.0
    for i in range(0, 3600, 10):
        health.append_snapshot(s, {"time": t0 + i})
    segs = health._segments(s.health_dir)
    assert len(segs) <= 600 / 60 + 2
    times = [x["time"] for x in health.read_history(s)]
    newest = t0 + 3590
    assert newest - min(times) <= 600 + 60
    assert newest - min(times) >= 600 - 10
    assert times == sorted(times) and times[-1] == newest


def test_a_torn_last_line_is_skipped_and_later_lines_survive(settings):
    health.append_snapshot(settings, {"time": 10.0, "n": 1})
    [(_, seg)] = health._segments(settings.health_dir)
    with open(seg, "ab") as f:
        f.write(b'{"time": 11.0, "n": ')  # killed mid-write
    assert [x["n"] for x in health.read_history(settings)] == [1]
    health.append_snapshot(settings, {"time": 12.0, "n": 3})
    assert [x["n"] for x in health.read_history(settings)] == [1, 3]


def test_monitor_fires_on_its_schedule_and_stops_cleanly(tmp_path):
    s = load_settings(tmp_path / "home", health_interval=0.2, nanochat_base_dir=tmp_path)
    mon = health.HealthMonitor(s)
    t0 = time.monotonic()
    mon.start()
    try:
        wait_until(lambda: mon.count >= 1, timeout=5, message="the first snapshot at once")
        first = time.monotonic() - t0
        wait_until(lambda: mon.count >= 4, timeout=10, message="snapshots on the interval")
    finally:
        mon.stop()
    assert first < 3
    n = mon.count
    time.sleep(0.5)
    assert mon.count == n
    assert len(health.read_history(s)) == n
    assert health.read_latest(s)["time"] == mon.latest["time"]


def test_a_warning_fires_once_while_it_lasts(tmp_path):
    s = load_settings(tmp_path / "home", nanochat_base_dir=tmp_path, disk_min_free="1000TB", ram_min_free=1)
    seen = []
    mon = health.HealthMonitor(s, on_warning=seen.append)
    for _ in range(3):
        snap = mon.run_once()
        assert any(w.startswith("disk ") and "below 1000.0TB" in w for w in snap["warnings"])
    # home and checkpoints share this filesystem: one warning, once
    assert len(seen) == 1 and "(checkpoints)" in seen[0] and "below 1000.0TB" in seen[0]


def test_disks_on_two_filesystems_warn_separately(settings):
    s = load_settings(settings.home, disk_min_free="1TB")
    snap = {"disk": {"checkpoints": {"path": "/a", "free_bytes": 1, "device": 1},
                     "home": {"path": "/b", "free_bytes": 1, "device": 2}}}
    assert [k for k, _ in health.evaluate_warnings(s, snap)] == ["disk:checkpoints", "disk:home"]


def test_a_warning_that_clears_is_announced_again_when_it_returns(tmp_path):
    s = load_settings(tmp_path / "home", nanochat_base_dir=tmp_path)
    seen = []
    mon = health.HealthMonitor(s, on_warning=seen.append)
    mon._announce([("ram", "low")])
    mon._announce([("ram", "low (still)")])
    mon._announce([])
    mon._announce([("ram", "low again")])
    assert seen == ["low", "low again"]


def test_vram_warning_above_the_fraction(settings):
    snap = {"gpu": {"gpus": [{"index": 0, "total_bytes": 8 << 30, "used_bytes": int(7.5 * (1 << 30))},
                             {"index": 1, "total_bytes": 8 << 30, "used_bytes": 1 << 30}]}}
    [(key, text)] = health.evaluate_warnings(settings, snap)
    assert key == "vram:0" and text.startswith("GPU 0 VRAM 94% used")


def test_monitor_survives_a_failing_callback(tmp_path):
    s = load_settings(tmp_path / "home", nanochat_base_dir=tmp_path, ram_min_free="1000TB")

    def bad(text):
        raise RuntimeError("boom")

    mon = health.HealthMonitor(s, on_warning=bad)
    assert mon.run_once() is not None
