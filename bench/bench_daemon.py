"""The daemon's own costs: reaction times, idle footprint, and what it takes from training.

Figures (one JSON object each, the last stdout lines; DESIGN.md's performance table):
- drop_to_trainer_start: a plan renamed into the inbox -> the attempt's pid on record
  (the process exists), with the real trainer. Median over --runs jobs; each is
  cancelled right after its start.
- restart_latency: the trainer SIGKILLed -> the next attempt's pid on record. The
  job's backoff_max is tiny, so every restart is what the first one always is:
  immediate. Median over --runs kills.
- stall_detection: SIGSTOP after a step line -> the daemon stops the group; minus
  stall_timeout (target: at most 2 s over it). Median over --stall-runs.
- daemon_idle_rss_mb, daemon_idle_cpu_percent: an idle daemon over --idle seconds.
- tokens_per_sec_ratio: tok/sec of the step lines under nanod / the bare trainer,
  same plan, runs back to back in pairs (--tps-rounds); the median of the pairs' ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = {"depth": 2, "max_seq_len": 32, "device_batch_size": 4, "total_batch_size": 128}
# tokens/s needs steps long enough that timer noise and Python overhead do not decide the ratio
# (~0.5 s a step here; a 10 ms step varied by 2x between identical bare runs), one OpenMP thread
# in both runs so that neither spins against the other process on a small machine
TPS = {"depth": 4, "max_seq_len": 64, "device_batch_size": 16, "total_batch_size": 1024}


class Bench:
    def __init__(self, base: Path):
        self.home, self.root = base / "home", base / "nanochat"
        self.env = {**os.environ, "NANOCHAT_BASE_DIR": str(self.root), "NANOD_LOCK_DIR": str(base / "locks"),
                    "PYTHONUNBUFFERED": "1"}
        for k in ("NANOD_HOME", "NANOD_CONFIG", "NOTIFY_SOCKET"):
            self.env.pop(k, None)
        self.daemon: subprocess.Popen | None = None
        self.log = base / "daemon.log"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.daemon = subprocess.Popen([PY, "-m", "daemon.cli", "--home", str(self.home), "run"], env=self.env,
                                           cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        until(lambda: (read(self.home / "state" / "daemon.json") or {}).get("pid") == self.daemon.pid, 60)

    def stop(self) -> None:
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(120)

    def drop(self, job: dict) -> float:
        inbox = self.home / "jobs"
        tmp = inbox / f".{job['name']}.tmp"
        tmp.write_text(yaml.safe_dump(job))
        t0 = time.perf_counter()
        os.replace(tmp, inbox / f"{job['name']}.yaml")
        return t0

    def record(self, name: str) -> dict:
        return read(self.home / "state" / "jobs" / f"{name}.json") or {}

    def live_pid(self, name: str, n: int) -> int | None:
        atts = self.record(name).get("attempts") or []
        if len(atts) >= n and atts[n - 1].get("pid") and atts[n - 1].get("ended_at") is None:
            return atts[n - 1]["pid"]
        return None

    def request(self, action: str, name: str) -> None:
        d = self.home / "requests"
        tmp = d / f".{time.time_ns()}.tmp"
        tmp.write_text(json.dumps({"action": action, "job": name}))
        os.replace(tmp, d / f"{time.time_ns()}-{action}.json")


def job(name: str, steps: int = 4, shape: dict = TINY, env: dict | None = None, **recovery) -> dict:
    return {"name": name, "model_tag": name, "env": env or {},
            "recovery": {"max_restarts_without_progress": 1000, "stall_timeout": "10m", "startup_grace": "10m",
                         "kill_grace": "30s", **recovery},
            "phases": [{"phase": "base", "args": {**shape, "num_iterations": steps, "save_every": 1000}}]}


def read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def until(cond, timeout: float, interval: float = 0.002):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {cond}")
        time.sleep(interval)


# ---- the figures -------------------------------------------------------------------
def bench_drop_to_start(b: Bench, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        name = f"drop{i:03d}"
        t0 = b.drop(job(name))
        until(lambda: b.live_pid(name, 1), 60)
        out.append(time.perf_counter() - t0)
        b.request("cancel", name)
        until(lambda: b.record(name).get("state") == "cancelled", 120, 0.02)
    return out


def bench_restart(b: Bench, runs: int) -> list[float]:
    name = "restarts"
    b.drop(job(name, steps=100000, backoff_max="1ms"))
    out = []
    for n in range(1, runs + 1):
        pid = until(lambda: b.live_pid(name, n), 60)
        time.sleep(0.2)  # let it get going
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        until(lambda: b.live_pid(name, n + 1), 60)
        out.append(time.perf_counter() - t0)
    b.request("cancel", name)
    until(lambda: b.record(name).get("state") == "cancelled", 120, 0.02)
    return out


def bench_stall(b: Bench, runs: int, stall_timeout: float = 2.0) -> list[float]:
    out = []
    for i in range(runs):
        name = f"stall{i:02d}"
        b.drop(job(name, steps=100000, stall_timeout=f"{stall_timeout}s", kill_grace="5s"))
        until(lambda: b.live_pid(name, 1) and (b.record(name).get("progress") or {}).get("step"), 120, 0.01)
        pid = b.live_pid(name, 1)
        os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        ev = until(lambda: next((e for e in b.record(name).get("events", []) if e["kind"] == "stop_stall"), None),
                   60, 0.02)
        out.append(ev["at"] - t0 - stall_timeout)
        b.request("cancel", name)
        until(lambda: b.record(name).get("state") == "cancelled", 120, 0.05)
    return out


def bench_idle(b: Bench, seconds: float) -> tuple[float, float]:
    import psutil
    proc = psutil.Process(b.daemon.pid)
    time.sleep(2.0)
    c0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    c1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
    return proc.memory_info().rss / 2**20, 100.0 * (c1 - c0) / (t1 - t0)


STEP_TPS = re.compile(r"^step\s+(\d+)/\d+.*\|\s*tok/sec:\s*([0-9,]+)", re.M)


def step_tps(text: str, skip: int = 3) -> list[float]:
    return [float(t.replace(",", "")) for s, t in STEP_TPS.findall(text) if int(s) >= skip]


def bench_tokens(b: Bench, rounds: int, steps: int) -> tuple[list[float], float, float]:
    """Per round, the median tok/s of a bare run and of a run under nanod, back to back.

    The ratio is taken per pair (a change in the machine's load hits both alike) and
    its median reported; identical bare runs differ by about 5 % on a shared 2-core box.
    """
    ratios, bare_all, under_all = [], [], []
    args = {**TPS, "num_iterations": steps, "save_every": 1000}
    for r in range(rounds):
        cmd = [PY, "-m", "trainer", "base", *(f"--{k}={v}" for k, v in args.items()), f"--model_tag=bare{r}"]
        env = {**b.env, "PYTORCH_ALLOC_CONF": "expandable_segments:True", "OMP_NUM_THREADS": "1"}
        bare = step_tps(subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        name = f"tps{r}"
        b.drop(job(name, steps=steps, shape=TPS, env={"OMP_NUM_THREADS": "1"}))
        until(lambda: b.record(name).get("state") in ("done", "failed"), 600, 0.1)
        under = step_tps((b.home / "logs" / name / "attempt-001.log").read_text())
        ratios.append(statistics.median(under) / statistics.median(bare))
        bare_all += bare
        under_all += under
    return ratios, statistics.median(under_all), statistics.median(bare_all)


def figure(name: str, values, unit: str, target: float, **extra) -> dict:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return {"name": name, "median": round(statistics.median(values), 4), "unit": unit, "target": target,
            "runs": len(values), **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--stall-runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--tps-rounds", type=int, default=4)
    ap.add_argument("--tps-steps", type=int, default=30)
    args = ap.parse_args()
    figures = []
    with tempfile.TemporaryDirectory(prefix="nanod-bench-daemon-") as tmp:
        b = Bench(Path(tmp))
        b.start()
        try:
            rss, cpu = bench_idle(b, args.idle)
            figures.append(figure("daemon_idle_rss_mb", rss, "MB", 60, seconds=args.idle))
            figures.append(figure("daemon_idle_cpu_percent", cpu, "%", 1.0, seconds=args.idle))
            # the tokenizer and data are made on the first trainer start: not part of any figure
            subprocess.run([PY, "-m", "trainer", "base", *(f"--{k}={v}" for k, v in TINY.items()),
                            "--num_iterations=1", "--model_tag=warmup"], env=b.env, cwd=ROOT, capture_output=True)
            figures.append(figure("drop_to_trainer_start", bench_drop_to_start(b, args.runs), "s", 0.2))
            figures.append(figure("restart_latency", bench_restart(b, args.runs), "s", 1.0))
            if args.stall_runs:
                figures.append(figure("stall_detection_over_timeout", bench_stall(b, args.stall_runs), "s", 2.0))
            ratios, under, bare = bench_tokens(b, args.tps_rounds, args.tps_steps)
            figures.append(figure("tokens_per_sec_ratio", ratios, "ratio", 0.99, pairs=[round(x, 3) for x in ratios],
                                  under_nanod=round(under), bare=round(bare)))
        finally:
            b.stop()
    for f in figures:
        print(json.dumps(f), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
