"""GPU check: real CUDA OOM back-off on a simulated 8 GB card, and what each phase achieves.

    python -m bench.gpu_check [--vram-gb 8] [--minutes 8] [--out DIR]

On a lent GPU (an H100/H200 is far bigger than the cards nanod is for), the
trainer caps itself at --vram-gb with torch.cuda.set_per_process_memory_fraction
(NANOD_FAULT_VRAM_GB), so allocations past 8 GB raise a real CUDA OOM. The
guide's d8 plan (base -> mid -> sft, shortened) starts with a device_batch_size
far too large for that card, under a real daemon. The report shows each OOM
back-off down to the largest batch that fits, then tokens/s, MFU and peak VRAM
per phase, and the daemon's own VRAM reading (NVML). Figures go to stdout and,
as JSON, to --out (default $OUT when set).

`--autofit` runs instead the base phase of that plan twice on the same simulated
card, bare trainer runs of the same steps: once with the guide's settings
(device_batch_size 2, training-safety-guide.txt: "~4-4.5GB / 8GB (safe
margin)") and once with `device_batch_size: auto`. It reports the batch auto-fit
chose, its probes, the VRAM it measured at that batch (peak reserved / card: the
DESIGN.md target is 85-92 %), each run's peak allocated memory from the step
lines and the tok/s ratio auto / guide (issue 14's goal: >= 1.5). `--no-compile`
runs both without torch.compile (each probed batch otherwise compiles once).

`--smoke` runs the same plumbing on the CPU with a tiny model and a simulated
OOM (NANOD_FAULT_OOM_ABOVE), so the script itself is tested where no GPU is.
Without CUDA (and without --smoke) it says so in one line and exits 0: a skip.
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
STEP = re.compile(r"^step (\d+)/(\d+) .*?tok/sec: ([\d,]+)(?:.*?peak_mem: ([\d.]+)GiB)?")
PARAMS = re.compile(r"([\d,]+) params")
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "4090": 165.0, "4060": 60.0, "3090": 71.0}


def plan(args) -> dict:
    if args.smoke:
        shape = {"depth": 2, "max_seq_len": 64}
        batches, total = (16, 8, 8), 1024
        env = {"NANOD_FAULT_OOM_ABOVE": "4", "OMP_NUM_THREADS": "1"}
        steps = (12, 6, 6)
    else:
        # the guide's 8 GB plan, shortened; 128 rows of 1024 tokens is far past an 8 GB card
        shape = {"depth": 8, "max_seq_len": 1024}
        batches, total = (128, 128, 64), 131072
        env = {"NANOD_FAULT_VRAM_GB": str(args.vram_gb)}
        steps = (args.base_steps, args.base_steps // 2, args.base_steps // 4)
    return {
        "name": "gpu-check", "model_tag": "gpucheck",
        "env": {"PYTORCH_ALLOC_CONF": "expandable_segments:True", **env},
        "recovery": {"max_restarts_without_progress": 3, "stall_timeout": "3m", "startup_grace": "10m"},
        "retention": {"keep_last": 2},
        "phases": [
            {"phase": "base", "args": {**shape, "device_batch_size": batches[0], "total_batch_size": total,
                                       "num_iterations": steps[0], "save_every": max(1, steps[0] // 2)}},
            {"phase": "mid", "args": {"max_seq_len": shape["max_seq_len"], "device_batch_size": batches[1],
                                      "total_batch_size": total, "num_iterations": steps[1], "save_every": steps[1]}},
            {"phase": "sft", "args": {"max_tokens": shape["max_seq_len"], "device_batch_size": batches[2],
                                      "total_batch_size": total // 2, "num_iterations": steps[2],
                                      "save_every": steps[2]}},
        ],
    }


def step_figures(text: str) -> tuple[list[int], float, int | None]:
    """(tok/s of each step line after step 0, the peak memory they name, the params of the model line)."""
    tps, peak, params = [], 0.0, None
    for line in text.splitlines():
        m = STEP.match(line)
        if m:
            if int(m.group(1)) > 0:  # step 0 carries compilation and warm-up
                tps.append(int(m.group(3).replace(",", "")))
            if m.group(4):
                peak = max(peak, float(m.group(4)))
        elif params is None and (p := PARAMS.search(line)):
            params = int(p.group(1).replace(",", ""))
    return tps, peak, params


def read_attempts(home: Path, rec: dict) -> list[dict]:
    """Per attempt: phase, batch size, outcome, tok/s and peak memory from its step lines."""
    rows = []
    for a in rec.get("attempts", []):
        try:
            text = (home / a["log"]).read_text(errors="replace")
        except OSError:
            text = ""
        tps, peak, params = step_figures(text)
        rows.append({"n": a["n"], "phase": a["phase"], "device_batch_size": a.get("device_batch_size"),
                     "outcome": a.get("outcome"), "error": (a.get("error") or "")[:100],
                     "tok_per_sec": statistics.median(tps) if tps else None, "peak_mem_gib": peak or None,
                     "params": params})
    return rows


AUTOFIT_LINE = re.compile(r"^auto-fit: device_batch_size (\d+) \((.*)\)$", re.M)
GUIDE_BASE_BATCH = 2   # the guide's base device_batch_size on an 8 GB card (d8, 1024-token rows)


def autofit_runs(args, work: Path) -> dict:
    """The guide's base settings and device_batch_size auto, one bare trainer run each, same card and steps."""
    if args.smoke:
        shape = ["--depth=2", "--max_seq_len=64", "--total_batch_size=1024"]
        card = {"NANOD_FAULT_OOM_ABOVE": "8", "OMP_NUM_THREADS": "1"}
    else:
        # 192 rows a step: divisors 1, 2, 3, 4, 6, 8, 12, 16, 24 ... (2^k rows would allow powers of two only)
        shape = ["--depth=8", "--max_seq_len=1024", "--total_batch_size=196608"]
        card = {"NANOD_FAULT_VRAM_GB": str(args.vram_gb)}
    steps = max(3, args.base_steps // 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(NANOCHAT_BASE_DIR=str(work / "nanochat"), PYTHONUNBUFFERED="1",
               PYTORCH_ALLOC_CONF="expandable_segments:True", **card)
    if args.no_compile:
        env["TORCH_COMPILE_DISABLE"] = "1"
    runs = {}
    for name, batch in (("guide", str(GUIDE_BASE_BATCH)), ("auto", "auto")):
        argv = [sys.executable, "-m", "trainer", "base", *shape, f"--device_batch_size={batch}",
                f"--num_iterations={steps}", "--save_every=-1", f"--model_tag={name}"]
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.minutes * 60)
            out, err, code = r.stdout, r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out, err = ((b or b"").decode(errors="replace") for b in (e.stdout, e.stderr))
            code = None
        tps, peak, _ = step_figures(out)
        fit = AUTOFIT_LINE.search(err)
        runs[name] = {"exit": code, "seconds": round(time.monotonic() - t0, 1),
                      "device_batch_size": int(fit.group(1)) if fit else int(batch) if batch.isdigit() else None,
                      "autofit": fit.group(2) if fit else None,
                      "tok_per_sec": statistics.median(tps) if tps else None, "peak_alloc_gib": peak or None,
                      "error": "" if code == 0 else (err.strip().splitlines() or [""])[-1][:200]}
        meta = work / "nanochat" / "base_checkpoints" / name / f"meta_{steps:06d}.json"
        try:
            runs[name]["meta_autofit"] = json.loads(meta.read_text())["nanod"].get("autofit")
        except (OSError, ValueError, KeyError):
            runs[name]["meta_autofit"] = None
    guide, auto = runs["guide"]["tok_per_sec"], runs["auto"]["tok_per_sec"]
    fit = runs["auto"]["meta_autofit"] or {}
    return {"runs": runs, "steps": steps, "ratio": round(auto / guide, 3) if guide and auto else None,
            "vram_frac": fit.get("peak_frac"), "card_gib": (fit.get("card_bytes") or 0) / 2**30 or None}


def report_autofit(result: dict) -> bool:
    """Print the comparison and its two figures; True when both runs completed."""
    print(f"{'run':<6} {'rows':>5} {'tok/s':>10} {'peak alloc':>11} {'exit':>5}  auto-fit")
    for name, r in result["runs"].items():
        tps = f"{r['tok_per_sec']:,.0f}" if r["tok_per_sec"] else "-"
        peak = f"{r['peak_alloc_gib']:.2f}GiB" if r["peak_alloc_gib"] else "-"
        print(f"{name:<6} {r['device_batch_size'] or '-':>5} {tps:>10} {peak:>11} {str(r['exit']):>5}  "
              f"{r['autofit'] or r['error'] or ''}")
    frac, ratio = result["vram_frac"], result["ratio"]
    print(f"auto-fit: VRAM at the chosen batch {'-' if frac is None else f'{100 * frac:.0f}%'} of the card "
          f"(target 85-92%); tok/s auto / guide {'-' if ratio is None else f'{ratio:.2f}'} (goal >= 1.5)")
    print(json.dumps({"name": "autofit_vram_frac", "median": frac, "unit": "", "target": None, "range": [0.85, 0.92]}))
    print(json.dumps({"name": "autofit_vs_guide_tokens_per_sec_ratio", "median": ratio, "unit": "x",
                      "target": 1.5}))
    return all(r["exit"] == 0 for r in result["runs"].values())


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--vram-gb", type=float, default=8.0, help="the simulated card (GiB)")
    ap.add_argument("--base-steps", type=int, default=40, help="base steps (mid half, sft a quarter)")
    ap.add_argument("--minutes", type=float, default=8.0, help="give up after this long")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing test: tiny model, simulated OOM")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (logs, checkpoints)")
    ap.add_argument("--autofit", action="store_true",
                    help="device_batch_size auto against the guide's base settings on the simulated card")
    ap.add_argument("--no-compile", action="store_true", help="--autofit: both runs without torch.compile")
    args = ap.parse_args(argv)

    gpu_name = ""
    if not args.smoke:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            print("gpu_check: skipped: no CUDA GPU here (use --smoke for the CPU plumbing test)", file=sys.stderr)
            print(json.dumps({"name": "gpu_check_state", "median": None, "unit": "", "target": None,
                              "skipped": "no CUDA GPU"}))
            return 0
        gpu_name = probe.stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="nanod-gpucheck-"))
    if args.autofit:
        result = autofit_runs(args, work)
        print(f"GPU: {gpu_name or 'none (smoke test on the CPU)'}; simulated card {args.vram_gb:g} GiB; "
              f"{result['steps']} base steps each")
        ok = report_autofit(result)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_check_autofit.json").write_text(json.dumps({"gpu": gpu_name, **result}, indent=1))
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        return 0 if ok else 1
    home, root = work / "home", work / "nanochat"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(NANOD_HOME=str(home), NANOCHAT_BASE_DIR=str(root), NANOD_LOCK_DIR=str(work / "locks"),
               NANOD_HEALTH_INTERVAL="5s", PYTHONUNBUFFERED="1")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], cwd=ROOT, env=env,
                              stdout=open(work / "daemon.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    record_path = home / "state" / "jobs" / "gpu-check.json"
    t0 = time.monotonic()
    rec: dict = {}
    try:
        while not (home / "jobs").is_dir():
            time.sleep(0.1)
        (home / "jobs" / ".gpu-check.tmp").write_text(yaml.safe_dump(plan(args)))
        os.replace(home / "jobs" / ".gpu-check.tmp", home / "jobs" / "gpu-check.yaml")
        last = ""
        while time.monotonic() - t0 < args.minutes * 60:
            try:
                rec = json.loads(record_path.read_text())
            except (OSError, ValueError):
                time.sleep(0.5)
                continue
            prog = rec.get("progress") or {}
            line = f"{rec.get('state')} {prog.get('phase', '')} step {prog.get('step')} dbs {rec.get('device_batch_size')}"
            if line != last:
                print(f"[{time.monotonic() - t0:6.1f}s] {line}", flush=True)
                last = line
            if rec.get("state") in ("done", "failed", "cancelled"):
                break
            time.sleep(1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
    attempts = read_attempts(home, rec)
    health = {}
    try:
        health = json.loads((home / "health" / "latest.json").read_text())
    except (OSError, ValueError):
        pass
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    peak = peak_tflops(gpu_name)
    print(f"\nGPU: {gpu_name or 'none (smoke test on the CPU)'}; simulated card {args.vram_gb:g} GiB; "
          f"job {rec.get('state')} in {time.monotonic() - t0:.0f}s")
    print(f"{'#':>2} {'phase':<5} {'rows':>5} {'outcome':<12} {'tok/s':>10} {'MFU':>6} {'peak':>8}")
    for a in attempts:
        mfu = None
        if peak and a["tok_per_sec"] and a["params"]:
            mfu = 6 * a["params"] * a["tok_per_sec"] / (peak * 1e12)
        a["mfu"] = mfu
        tps = f"{a['tok_per_sec']:,.0f}" if a["tok_per_sec"] else "-"
        mfu_text = "-" if mfu is None else f"{100 * mfu:.1f}%"
        peak_text = f"{a['peak_mem_gib']:.2f}GiB" if a["peak_mem_gib"] else "-"
        print(f"{a['n']:>2} {a['phase']:<5} {a['device_batch_size'] or '-':>5} {a['outcome'] or '-':<12} {tps:>10} "
              f"{mfu_text:>6} {peak_text:>8}")
    for e in rec.get("events", []):
        if e.get("kind") in ("oom_backoff", "failed", "done"):
            print(f"  event {e['kind']}: {e['message']}")
    result = {"gpu": gpu_name, "vram_gb": args.vram_gb, "state": rec.get("state"), "attempts": attempts,
              "working_device_batch_size": rec.get("device_batch_size"), "health": health.get("gpu")}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"name": "gpu_check_state", "median": None, "unit": "", "target": None,
                      "state": rec.get("state")}))
    return 0 if rec.get("state") == "done" and any(a["outcome"] == "oom" for a in attempts) else 1


if __name__ == "__main__":
    sys.exit(main())
