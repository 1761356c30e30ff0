"""`make bench` / `python -m bench`: every benchmark in one go, one table, one JSON report.

Each bench_*.py runs as its own process and prints one JSON object per figure
({name, median, unit, target, ...}) on its last stdout lines; this collects them
and compares each median with its DESIGN.md target. Ratios (tokens/s under nanod
vs the bare trainer, async vs synchronous save) are measured side by side inside
one bench, in the same run. Exit 1 when a figure misses its target.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ["bench_checkpoint", "bench_trainer", "bench_status", "bench_daemon", "bench_notify", "bench_vs_nanochat",
           "bench_slurm", "bench_autofit", "bench_chat"]
# every other target is an upper bound
HIGHER_IS_BETTER = {"tokens_per_sec_ratio", "vs_nanochat_tokens_per_sec_ratio"}


def run_bench(name: str, extra: list[str]) -> tuple[list[dict], str]:
    r = subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], cwd=ROOT, capture_output=True, text=True)
    figures = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "name" in obj and "median" in obj:
                figures.append(obj)
    error = "" if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    return figures, error


def verdict(fig: dict) -> str:
    target, median = fig.get("target"), fig.get("median")
    if fig.get("skipped"):
        return "skipped"  # a figure that needs what this machine lacks (the real nanochat): said, not failed
    if target is None or median is None:
        return "info"
    ok = median >= target if fig["name"] in HIGHER_IS_BETTER else median <= target
    return "pass" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=BENCHES, help="run only these benches")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "report.json"))
    args = ap.parse_args(argv)
    rows, errors = [], []
    for name in args.only or BENCHES:
        t0 = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        figures, error = run_bench(name, [])
        if error:
            errors.append(f"{name}: {error}")
        for f in figures:
            rows.append({**f, "bench": name, "verdict": verdict(f)})
        print(f"  {name}: {len(figures)} figures in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    print(f"\n{'figure':<34}{'median':>12} {'unit':<6}{'target':>10}  verdict")
    for r in rows:
        op = ">=" if r["name"] in HIGHER_IS_BETTER else "<="
        target = "-" if r.get("target") is None else f"{op}{r['target']:g}"
        median = "-" if r["median"] is None else f"{r['median']:g}"
        print(f"{r['name']:<34}{median:>12} {r.get('unit', ''):<6}{target:>10}  {r['verdict']}")
        if r.get("skipped"):
            print(f"  ({r['skipped']})")
    for e in errors:
        print(f"error: {e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"at": time.time(), "figures": rows, "errors": errors}, indent=1))
    print(f"\nsaved {out}")
    return 1 if errors or any(r["verdict"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
