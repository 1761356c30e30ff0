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
  same plan, in pairs (--tps-rounds) whose order alternates; the median of the pairs'
  ratios, every pair beside it.
- trainer_cpu_per_step_ratio, daemon_cpu_percent_while_training (info, no target):
  what survives a noisy machine: the trainer's CPU seconds per step under nanod / bare
  (with voluntary and involuntary context switches per step), and the daemon's CPU use
  while the trainer steps.
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
FIRST_MEASURED_STEP = 3   # steps before this warm up (allocator, caches) and are not counted


def step_tps(text: str, skip: int = FIRST_MEASURED_STEP) -> list[float]:
    return [float(t.replace(",", "")) for s, t in STEP_TPS.findall(text) if int(s) >= skip]


def follow_run(pid: int, log: Path, steps: int, daemon_pid: int | None = None) -> dict:
    """One trainer run followed through its log: tok/s of its step lines, and psutil samples of
    its CPU time and context switches (and the daemon's CPU time) between step lines
    FIRST_MEASURED_STEP and steps - 2, while it surely lives. CPU seconds per step do not
    depend on how busy the machine is; voluntary switches per step count the trainer's waits."""
    import psutil
    proc, daemon = psutil.Process(pid), psutil.Process(daemon_pid) if daemon_pid else None
    marks, samples = (FIRST_MEASURED_STEP, steps - 2), []
    while len(samples) < 2:
        text = log.read_text() if log.exists() else ""
        if f"step {marks[len(samples)]:05d}/" in text:
            try:
                cpu, ctx = proc.cpu_times(), proc.num_ctx_switches()
                dcpu = daemon.cpu_times() if daemon else None
            except psutil.NoSuchProcess:
                break
            samples.append((time.monotonic(), cpu.user + cpu.system, ctx.voluntary, ctx.involuntary,
                            dcpu.user + dcpu.system if dcpu else 0.0))
            continue
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.02)   # the same polling for both kinds of run: it costs them alike
    until(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, 600, 0.05)
    out = {"tps": step_tps(log.read_text())}
    if len(samples) == 2:
        (t0, c0, v0, i0, d0), (t1, c1, v1, i1, d1) = samples
        n = marks[1] - marks[0]
        out.update(cpu_per_step=(c1 - c0) / n, voluntary_per_step=(v1 - v0) / n, involuntary_per_step=(i1 - i0) / n,
                   daemon_cpu_percent=100.0 * (d1 - d0) / (t1 - t0))
    return out


def bench_tokens(b: Bench, rounds: int, steps: int) -> dict:
    """tok/s of the same plan run bare and under nanod, in pairs whose order alternates.

    The ratio is taken per pair (a change in the machine's load hits both alike) and its
    median reported with every pair. Identical bare runs differ by about 5 % on a shared
    2-core box, so beside the wall-clock ratio come figures that noise hardly moves: the
    trainer's CPU seconds per step under nanod / bare (more work under nanod?), its
    voluntary context switches per step (waits, e.g. on I/O), and the daemon's own CPU
    use while the trainer steps.
    """
    args = {**TPS, "num_iterations": steps, "save_every": 1000}
    runs: dict[str, list[dict]] = {"bare": [], "under": []}
    for r in range(rounds):
        for kind in (("bare", "under") if r % 2 == 0 else ("under", "bare")):
            if kind == "bare":
                log = b.home.parent / f"bare{r}.log"
                cmd = [PY, "-m", "trainer", "base", *(f"--{k}={v}" for k, v in args.items()), f"--model_tag=bare{r}"]
                env = {**b.env, "PYTORCH_ALLOC_CONF": "expandable_segments:True", "OMP_NUM_THREADS": "1"}
                with open(log, "w") as out:   # a file, as nanod's attempt log is: the same kind of stdout
                    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
                runs[kind].append(follow_run(proc.pid, log, steps))
                if proc.wait() != 0:
                    raise RuntimeError(f"bare run {r} failed: {log.read_text()[-500:]}")
            else:
                name = f"tps{r}"
                b.drop(job(name, steps=steps, shape=TPS, env={"OMP_NUM_THREADS": "1"}))
                pid = until(lambda: b.live_pid(name, 1), 120, 0.01)
                runs[kind].append(follow_run(pid, b.home / "logs" / name / "attempt-001.log", steps, b.daemon.pid))
                until(lambda: b.record(name).get("state") in ("done", "failed"), 600, 0.1)
    pairs = list(zip(runs["bare"], runs["under"]))
    ratio = [statistics.median(u["tps"]) / statistics.median(a["tps"]) for a, u in pairs]
    cpu = [u["cpu_per_step"] / a["cpu_per_step"] for a, u in pairs if "cpu_per_step" in a and "cpu_per_step" in u]

    def med(kind: str, key: str):
        vals = [x[key] for x in runs[kind] if key in x]
        return round(statistics.median(vals), 4) if vals else None
    return {"ratio": ratio, "cpu_ratio": cpu,
            "under_tps": statistics.median(x for u in runs["under"] for x in u["tps"]),
            "bare_tps": statistics.median(x for a in runs["bare"] for x in a["tps"]),
            "daemon_cpu_percent": [u["daemon_cpu_percent"] for u in runs["under"] if "daemon_cpu_percent" in u],
            "per_step": {k: {key: med(k, key) for key in ("cpu_per_step", "voluntary_per_step", "involuntary_per_step")}
                         for k in runs}}


def figure(name: str, values, unit: str, target: float, **extra) -> dict:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return {"name": name, "median": round(statistics.median(values), 4), "unit": unit, "target": target,
            "runs": len(values), **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--stall-runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--tps-rounds", type=int, default=6, help="pairs of runs, bare and under nanod, order alternating")
    ap.add_argument("--tps-steps", type=int, default=40, help="steps of each run (~0.5 s each here)")
    ap.add_argument("--only-tps", action="store_true", help="only the tokens/s pairs (skip the other figures)")
    args = ap.parse_args()
    figures = []
    with tempfile.TemporaryDirectory(prefix="nanod-bench-daemon-") as tmp:
        b = Bench(Path(tmp))
        b.start()
        try:
            if not args.only_tps:
                rss, cpu = bench_idle(b, args.idle)
                figures.append(figure("daemon_idle_rss_mb", rss, "MB", 60, seconds=args.idle))
                figures.append(figure("daemon_idle_cpu_percent", cpu, "%", 1.0, seconds=args.idle))
            # the tokenizer and data are made on the first trainer start: not part of any figure
            subprocess.run([PY, "-m", "trainer", "base", *(f"--{k}={v}" for k, v in TINY.items()),
                            "--num_iterations=1", "--model_tag=warmup"], env=b.env, cwd=ROOT, capture_output=True)
            if not args.only_tps:
                figures.append(figure("drop_to_trainer_start", bench_drop_to_start(b, args.runs), "s", 0.2))
                figures.append(figure("restart_latency", bench_restart(b, args.runs), "s", 1.0))
                if args.stall_runs:
                    figures.append(figure("stall_detection_over_timeout", bench_stall(b, args.stall_runs), "s", 2.0))
            t = bench_tokens(b, args.tps_rounds, args.tps_steps)
            figures.append(figure("tokens_per_sec_ratio", t["ratio"], "ratio", 0.99,
                                  pairs=[round(x, 3) for x in t["ratio"]], under_nanod=round(t["under_tps"]),
                                  bare=round(t["bare_tps"]), steps=args.tps_steps))
            if t["cpu_ratio"]:
                figures.append(figure("trainer_cpu_per_step_ratio", t["cpu_ratio"], "ratio", None,
                                      pairs=[round(x, 3) for x in t["cpu_ratio"]], per_step=t["per_step"]))
            if t["daemon_cpu_percent"]:
                figures.append(figure("daemon_cpu_percent_while_training", t["daemon_cpu_percent"], "%", None))
        finally:
            b.stop()
    for f in figures:
        print(json.dumps(f), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
