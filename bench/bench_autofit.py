"""The auto-fit search on the CPU: its time and number of probes for the demo's base shape.

    python -m bench.bench_autofit [--rounds 3] [--oom-above 8]

Runs `python -m trainer base --device_batch_size=auto` on the base phase of
jobs/examples/tiny-cpu.yaml (depth 2, 64-token rows, 1,024 tokens a step: 16
rows, so the candidates are 1, 2, 4, 8, 16) with NANOD_FAULT_OOM_ABOVE as the
simulated card, one optimizer step each, and reads what the meta records
(`nanod.autofit`: the probes and the seconds they took, from the first probe to
the weights put back). The medians over the rounds are the figures; there is no
target (the GPU's share of the card is bench/gpu_check.py --autofit).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--depth=2", "--max_seq_len=64", "--total_batch_size=1024", "--num_iterations=1", "--save_every=-1",
        "--device_batch_size=auto"]


def one_search(root: Path, n: int, oom_above: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(NANOCHAT_BASE_DIR=str(root), NANOD_FAULT_OOM_ABOVE=str(oom_above),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    tag = f"fit{n}"
    r = subprocess.run([sys.executable, "-m", "trainer", "base", *ARGS, f"--model_tag={tag}"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"trainer exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    meta = json.loads((root / "base_checkpoints" / tag / "meta_000001.json").read_text())
    return meta["nanod"]["autofit"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--oom-above", type=int, default=8, help="NANOD_FAULT_OOM_ABOVE: the simulated card's limit")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanod-bench-autofit-") as tmp:
        fits = [one_search(Path(tmp), n, args.oom_above) for n in range(args.rounds)]
    chosen = {f["chosen"] for f in fits}
    if chosen != {args.oom_above}:
        print(f"auto-fit chose {sorted(chosen)}, not NANOD_FAULT_OOM_ABOVE={args.oom_above}", file=sys.stderr)
        return 1
    seconds = statistics.median(f["seconds"] for f in fits)
    probes = statistics.median(len(f["probes"]) for f in fits)
    said = ", ".join(f"{b} {'yes' if ok else 'no'}" for b, ok, _ in fits[0]["probes"])
    print(f"auto-fit on the demo's base shape, limit {args.oom_above}: probed {said}; median {seconds:.2f}s "
          f"over {args.rounds} runs", file=sys.stderr)
    print(json.dumps({"name": "autofit_search_seconds_cpu", "median": round(seconds, 3), "unit": "s", "target": None,
                      "runs": [f["seconds"] for f in fits], "probes": fits[0]["probes"]}))
    print(json.dumps({"name": "autofit_probes_cpu", "median": probes, "unit": "", "target": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
