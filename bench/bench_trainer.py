"""Tokens per second of the bare trainer on a small CPU config (the base phase of jobs/examples/tiny-cpu.yaml).

Runs `python -m trainer base ...` as a subprocess, exactly as the daemon
would, in a temporary NANOCHAT_BASE_DIR, and takes the median tok/sec of the
step lines after a short warm-up. The figure is a baseline for the "tokens/s
under nanod vs the bare trainer" ratio; it has no target of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

TOK_PER_SEC = re.compile(r"^step \d+/\d+ .*\| tok/sec: ([\d,]+)")
ARGS = ["--depth=2", "--max_seq_len=64", "--device_batch_size=8", "--total_batch_size=1024", "--save_every=-1"]


def tok_per_sec(stdout: str, skip: int) -> list[float]:
    values = [float(m.group(1).replace(",", "")) for m in map(TOK_PER_SEC.match, stdout.splitlines()) if m]
    return values[skip:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="step lines left out of the median")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanod-bench-trainer-") as tmp:
        env = {**os.environ, "NANOCHAT_BASE_DIR": tmp, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        r = subprocess.run([sys.executable, "-m", "trainer", "base", *ARGS, f"--num_iterations={args.steps}"],
                           env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        return 1
    values = tok_per_sec(r.stdout, args.warmup)
    median = statistics.median(values)
    print(f"{len(values)} steps of depth 2, 64-token rows, 1,024 tokens per step on the CPU: median {median:,.0f} tok/s "
          f"(min {min(values):,.0f}, max {max(values):,.0f})", file=sys.stderr)
    print(json.dumps({"name": "trainer_tokens_per_sec_cpu", "median": round(median, 1), "unit": "tok/s", "target": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
