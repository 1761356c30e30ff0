"""Benchmark: wall time of `nanod status` (target < 0.3 s), the real command as a subprocess.

It runs against a copy of the prepared "running" home (tests/fixtures/status/running:
a job with 200 loss points, a queue, events, a rejected file), so it measures
what a user waits for: interpreter start, imports, settings, reading the state,
rendering. The last stdout line is one JSON object {name, median, unit, target}.

    .venv/bin/python bench/bench_status.py [--runs 25] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "status" / "running" / "home"
TARGET_S = 0.3


def nanod_command() -> list[str]:
    """The installed console script when there is one beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("nanod")
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon.cli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--json", action="store_true", help="time `status --json` instead of the screen")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanod-bench-status-") as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(FIXTURE, home)
        env = {**os.environ, "NANOD_LOCK_DIR": str(Path(tmp) / "locks"), "NANOCHAT_BASE_DIR": str(Path(tmp) / "nc")}
        env.pop("NANOD_CONFIG", None)
        argv = nanod_command() + ["--home", str(home), "status"] + (["--json"] if args.json else [])
        for _ in range(2):  # warm the page cache and .pyc files: a user's second look, not a cold boot
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        times = []
        for _ in range(max(1, args.runs)):
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
            times.append(time.perf_counter() - t0)
    times.sort()
    print(f"runs {len(times)}: min {times[0]:.3f}s  median {statistics.median(times):.3f}s  "
          f"max {times[-1]:.3f}s  (target < {TARGET_S}s)")
    print(json.dumps({"name": "status" + ("_json" if args.json else ""), "median": round(statistics.median(times), 4),
                      "unit": "s", "target": TARGET_S}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
