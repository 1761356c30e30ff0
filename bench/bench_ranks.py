"""Several ranks on the CPU: what a second rank buys, and how fast a group is relaunched after a rank dies.

Figures (one JSON object each, the last stdout lines):
- ranks_tokens_per_sec_ratio: tok/sec of the step lines of two gloo ranks (torchrun,
  one OpenMP thread each) / one process (one thread), the same total batch, the same
  rows each step; runs back to back in pairs (--rounds), the median of the pairs'
  ratios, each run's median over its steady steps. On a GPU node the ratio is the
  speed-up of a second card; here it is a second CPU core, so a busy machine lowers it.
- rank_death_to_relaunch: under a real daemon, a job on gpus [0, 1]: rank 1 SIGKILLed
  -> the next attempt's keeper on record (the group stopped, the locks taken again).
- rank_death_to_training: the same kill -> the first step line of the next attempt
  (torchrun and two ranks started, the checkpoint loaded).
Both relaunch figures are medians over --kills kills. No DESIGN.md target: info only.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_daemon import PY, ROOT, Bench, until

SHAPE = {"depth": 4, "max_seq_len": 64, "device_batch_size": 8, "total_batch_size": 2048}  # 2 ranks x 8 x 64 x 2


def step_dts(out: str) -> list[float]:
    dts = []
    for line in out.splitlines():
        if line.startswith("step ") and "| dt: " in line:
            dts.append(float(line.split("| dt: ")[1].split("ms")[0]))
    return dts


def tokens_per_sec(root: Path, nproc: int, steps: int, tag: str) -> float:
    argv = [PY, "-m", "trainer", "base", *(f"--{k}={v}" for k, v in SHAPE.items()), f"--num_iterations={steps}",
            f"--model_tag={tag}"]
    if nproc > 1:
        argv = [PY, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
                "--max-restarts=0", *argv[1:]]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{tag}: exit {r.returncode}: {r.stderr[-2000:]}")
    dts = step_dts(r.stdout)
    dts = dts[3:] or dts  # the first steps warm up
    return SHAPE["total_batch_size"] / (statistics.median(dts) / 1000)


def stepped(log: Path) -> bool:
    try:
        return "\nstep 00" in log.read_text(errors="replace")
    except OSError:
        return False


def rank_of(keeper: int, rank: int) -> int | None:
    """The pid of rank `rank` of the group under `keeper` (torchrun's child with that RANK)."""
    from daemon import procs
    for pid in procs.descendants(keeper):
        if procs.parent(pid) != keeper and procs.environ(pid).get("RANK") == str(rank):
            return pid
    return None


def relaunch_times(base: Path, kills: int) -> tuple[list[float], list[float]]:
    b = Bench(base)
    b.env["OMP_NUM_THREADS"] = "1"
    (b.home / "jobs").mkdir(parents=True, mode=0o700)
    b.start()
    job = {"name": "pair", "model_tag": "pair", "gpus": [0, 1], "env": {"OMP_NUM_THREADS": "1"},
           "recovery": {"max_restarts_without_progress": 100, "backoff_max": 0.01, "startup_grace": "5m"},
           "phases": [{"phase": "base", "args": {"depth": 2, "max_seq_len": 32, "device_batch_size": 2,
                                                 "total_batch_size": 128, "num_iterations": 100000,
                                                 "save_every": 20}}]}
    to_relaunch, to_training = [], []
    try:
        b.drop(job)
        for n in range(1, kills + 1):
            keeper = until(lambda: b.live_pid("pair", n), 300)
            log = b.home / "logs" / "pair" / f"attempt-{n:03d}.log"
            until(lambda: stepped(log), 300, 0.02)
            rank1 = until(lambda: rank_of(keeper, 1), 60, 0.02)
            os.kill(rank1, signal.SIGKILL)
            t0 = time.time()
            until(lambda: b.live_pid("pair", n + 1), 120)
            to_relaunch.append(b.record("pair")["attempts"][n]["started_at"] - t0)
            until(lambda: stepped(b.home / "logs" / "pair" / f"attempt-{n + 1:03d}.log"), 300, 0.01)
            to_training.append(time.time() - t0)
    finally:
        b.request("cancel", "pair")
        until(lambda: b.record("pair").get("state") == "cancelled", 120)
        b.stop()
    return to_relaunch, to_training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_ranks", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kills", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nanod-bench-ranks-") as tmp:
        base = Path(tmp)
        root = base / "nanochat"
        tokens_per_sec(root, 1, 2, "warm")  # the tokenizer and data, once
        ratios, one_tps, two_tps = [], [], []
        for i in range(args.rounds):
            one = tokens_per_sec(root, 1, args.steps, f"one{i}")
            two = tokens_per_sec(root, 2, args.steps, f"two{i}")
            one_tps.append(one)
            two_tps.append(two)
            ratios.append(two / one)
        relaunch, training = relaunch_times(base / "daemon", args.kills)
    figures = [
        {"name": "ranks_tokens_per_sec_ratio", "median": round(statistics.median(ratios), 3), "unit": "x",
         "target": None, "samples": [round(r, 3) for r in ratios],
         "one_rank_tok_s": round(statistics.median(one_tps)), "two_ranks_tok_s": round(statistics.median(two_tps)),
         "shape": SHAPE},
        {"name": "rank_death_to_relaunch", "median": round(statistics.median(relaunch), 3), "unit": "s",
         "target": None, "samples": [round(x, 3) for x in relaunch]},
        {"name": "rank_death_to_training", "median": round(statistics.median(training), 3), "unit": "s",
         "target": None, "samples": [round(x, 3) for x in training]},
    ]
    for f in figures:
        print(json.dumps(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
