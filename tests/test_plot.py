"""`nanod plot`: loss across attempts with restart and OOM marks, VRAM and disk over time, as a PNG."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from daemon import health
from daemon.commands.plot import build_figure, collect, line_labels
from daemon.config import load_settings

NANOD = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]
T0 = time.time() - 3600


def step_line(step: int, total: int, loss: float) -> str:
    return f"step {step:05d}/{total:05d} ({100 * step / total:.2f}%) | loss: {loss:.6f} | dt: 80.00ms | tok/sec: 2,500\n"


def prepared_job(home: Path) -> dict:
    """A two-phase job: attempt 1 crashes at base step 12, attempt 2 OOMs at 22, 3 finishes base, 4 runs mid."""
    spec = {"name": "tiny", "phases": [{"phase": "base", "args": {"num_iterations": 40}},
                                       {"phase": "mid", "args": {"num_iterations": 20}}]}
    plan = [(1, "base", 1, 12, "crashed"), (2, "base", 11, 22, "oom"), (3, "base", 21, 40, "completed"),
            (4, "mid", 1, 8, None)]
    attempts = []
    for n, phase, first, last, outcome in plan:
        total = 40 if phase == "base" else 20
        log = home / "logs" / "tiny" / f"attempt-{n:03d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("loading data...\n" + "".join(step_line(s, total, 5.0 - 0.05 * s) for s in range(first, last + 1))
                       + ("Traceback (most recent call last):\n" if outcome == "crashed" else ""))
        attempts.append({"n": n, "phase": phase, "pid": 100 + n, "started_at": T0 + 600 * n,
                         "ended_at": T0 + 600 * n + 500 if outcome else None, "outcome": outcome,
                         "log": f"logs/tiny/attempt-{n:03d}.log", "device_batch_size": 2, "last_step": last})
    rec = {"schema": 1, "name": "tiny", "seq": 1, "state": "running", "spec": spec, "phase_index": 1,
           "submitted_at": T0, "attempts": attempts}
    (home / "state" / "jobs").mkdir(parents=True, exist_ok=True)
    (home / "state" / "jobs" / "tiny.json").write_text(json.dumps(rec))
    settings = load_settings(home)
    for i in range(6):  # written by health.py's own writer, as the daemon does
        health.append_snapshot(settings, {
            "schema": 1, "time": T0 + 600 * i,
            "gpu": {"source": "nvml", "gpus": [{"index": 0, "total_bytes": 8e9, "used_bytes": (4 + i % 2) * 1e9}]},
            "disk": {"checkpoints": {"path": "/x", "free_bytes": (50 - i) * 1e9, "total_bytes": 100e9},
                     "home": {"path": "/y", "free_bytes": 30e9, "total_bytes": 100e9}},
            "warnings": []})
    return rec


def test_figure_has_each_attempt_and_the_restart_and_oom_marks(tmp_path):
    home = tmp_path / "home"
    rec = prepared_job(home)
    data = collect(load_settings(home), rec)
    labels = line_labels(build_figure(data))
    for expected in ("attempt 1 (base)", "attempt 2 (base)", "attempt 3 (base)", "attempt 4 (mid)", "restart",
                     "OOM back-off", "VRAM used (GPU 0)", "VRAM total (GPU 0)", "disk free (checkpoints)",
                     "disk free (home)"):
        assert expected in labels
    # the mid phase is laid after base's 40 steps; the marks sit where attempts 1 and 2 ended
    mid = next(s for s in data["series"] if s["phase"] == "mid")
    assert mid["x"][0] == 42  # steps done: the line of (0-based) step 1 comes after 2 steps
    assert [(m["kind"], m["x"]) for m in data["marks"]] == [("restart", 13), ("oom", 23)]
    assert len(data["health"]["vram"][0][0]) == 6


def test_figure_without_logs_or_health_falls_back_to_the_record(tmp_path):
    home = tmp_path / "home"
    rec = {"name": "gone", "spec": {"phases": [{"phase": "base", "args": {}}]}, "attempts": [],
           "progress": {"phase": "base", "step": 3, "losses": [[1, 4.0], [2, 3.5], [3, 3.2]]}}
    data = collect(load_settings(home), rec)
    assert line_labels(build_figure(data)) == ["recent loss (record)"]


def test_plot_command_writes_a_png_and_prints_its_path(tmp_path):
    home = tmp_path / "home"
    prepared_job(home)
    out_png = tmp_path / "out" / "tiny.png"
    env = {**os.environ, "NANOD_LOCK_DIR": str(tmp_path / "locks")}
    out = subprocess.run([*NANOD, "--home", str(home), "plot", "tiny", "--out", str(out_png)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(out_png)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    short = tmp_path / "short.png"   # -o, as DESIGN.md's command line and users write it
    out = subprocess.run([*NANOD, "--home", str(home), "plot", "tiny", "-o", str(short)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert short.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([*NANOD, "--home", str(home), "plot", "nope"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
