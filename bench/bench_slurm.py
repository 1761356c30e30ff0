"""SLURM pre-emption -> training again, on a private one-node cluster (tests/slurm_cluster.py; root only).

A real `nanod run` follows one job (the built-in trainer on the CPU, slow steps so
that it is mid-run) whose batch job is requeued --requeues times with `scontrol
requeue`, as a pre-emption does. Each requeue is started again as soon as it pends
(SLURM would make it wait ~2 min for its BeginTime: that is the scheduler delay the
target excludes). Figures (one JSON object each, the last stdout lines):

- slurm_preempt_to_pending: `scontrol requeue` -> the job PENDING again (SIGTERM to every
  process, the trainer's emergency checkpoint, the run ended)
- slurm_pending_to_training: the job pending -> a step line of its new run (1 s of the
  test cluster's own wait before `StartTime=now`, the start, python and torch, the checkpoint loaded)
- slurm_preempt_to_training: the two together: DESIGN.md's "< scheduler delay + 30 s"
- slurm_steps_lost_per_requeue: steps done before the requeue minus the step resumed from
Without root or the packages it prints why and no figure.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_daemon import Bench, until

TARGET_S = 30.0


def steps(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^step (\d+)/", text, re.M)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_slurm", description=__doc__.splitlines()[0])
    ap.add_argument("--requeues", type=int, default=3)
    args = ap.parse_args(argv)
    from tests.slurm_cluster import Cluster, why_not
    reason = why_not()
    if reason:
        print(f"bench_slurm: skipped: {reason}", file=sys.stderr)
        return 0
    cluster = Cluster().start()
    base = Path(tempfile.mkdtemp(prefix="nanod-bench-slurm-"))
    b = Bench(base)
    b.env.update(SLURM_CONF=str(cluster.conf), NANOD_SLURM_POLL_INTERVAL="0.5s")
    killed, again, lost = [], [], []
    try:
        b.start()
        job = {"name": "bench", "model_tag": "bench", "slurm": {"partition": "debug"},
               "env": {"OMP_NUM_THREADS": "1", "NANOD_FAULT_SLOW_STEP_MS": "100"},
               "phases": [{"phase": "base", "args": {"depth": 2, "max_seq_len": 32, "device_batch_size": 4,
                                                     "total_batch_size": 128, "num_iterations": 2000,
                                                     "save_every": 100}}]}
        b.drop(job)
        att = until(lambda: ((b.record("bench").get("attempts") or [{}])[-1].get("slurm")), 120, 0.1)
        job_id, log = att["job_id"], b.home / b.record("bench")["attempts"][-1]["log"]
        for run in range(2, args.requeues + 2):
            mark = f"# nanod: slurm job {job_id} run {run - 1} on"
            until(lambda: (t := log.read_text()) and mark in t and len(steps(t[t.index(mark):])) >= 10, 120, 0.1)
            text = log.read_text()
            done = max(steps(text[text.index(mark):])) + 1
            t0 = time.monotonic()
            cluster.run("scontrol", "requeue", job_id)
            until(lambda: cluster.job(job_id).get("JobState") == "PENDING", 120, 0.05)
            t1 = time.monotonic()
            until(lambda: cluster.start_now(job_id), 60, 0.05)
            mark = f"# nanod: slurm job {job_id} run {run} on"
            until(lambda: (t := log.read_text()) and mark in t and steps(t[t.index(mark):]), 120, 0.05)
            t2 = time.monotonic()
            resumed = re.search(r"resumed from step (\d+) ", (t := log.read_text())[t.index(mark):])
            killed.append(t1 - t0)
            again.append(t2 - t1)
            lost.append(done - int(resumed.group(1)) if resumed else done)
    finally:
        b.stop()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    total = [k + a for k, a in zip(killed, again)]
    for name, values, unit, target in (("slurm_preempt_to_pending", killed, "s", None),
                                       ("slurm_pending_to_training", again, "s", None),
                                       ("slurm_preempt_to_training", total, "s", TARGET_S),
                                       ("slurm_steps_lost_per_requeue", lost, "steps", 0)):
        print(json.dumps({"name": name, "median": round(statistics.median(values), 3), "unit": unit,
                          "target": target, "values": [round(v, 3) for v in values]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
