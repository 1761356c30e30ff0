"""Tokens per second of the built-in trainer against nanochat HEAD's base_train: same shape, same data, same machine.

The shape is issue 11's: depth 2, head_dim 64, rows of 128 tokens, 4 rows a
micro-batch, 8,192-token steps (16 micro-batches), nanochat's offline data and
its 4,096-token vocabulary (our BPE trains its own on the same parquet files
and reaches the same size; the bench checks depth, width and vocab match).
nanochat's model has extras ours has not (value embeddings on every other layer,
per-layer residual scalars, smear and backout gates: ~0.5 M more parameters, lookups
mostly) and a different optimizer (Polar Express, NorMuon, cautious weight decay);
it is still the same job: next-token training of a 2-layer, 128-wide GPT.

Runs alternate, ours then nanochat's, --rounds times, each a fresh process of
--steps steps with the same OpenMP thread count. A run's figure is the median
tok/sec of its step lines after --warmup steps (nanochat's first step compiles);
each pair gives one ratio and the reported ratio is the median over the pairs
(target >= 1.0, DESIGN.md). A second ratio from the wall clock between step
lines (so nothing either trainer leaves out of its own timer escapes) is
reported for information.

Needs the real nanochat (../shared/nanochat or NANOCHAT_SRC, read-only: the
checkout and its data are copied to a temporary directory) and its interpreter
(.venv-nanochat, `make nanochat-venv`); without either it reports the figure as
skipped, with the reason. torch.compile's caches live in
$XDG_CACHE_HOME/nanod-bench, so only the first run pays nanochat's compile.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(os.environ.get("NANOCHAT_SRC") or ROOT.parent / "shared" / "nanochat")
SRC = SRC if SRC.is_absolute() else ROOT / SRC
NC_PYTHON = ROOT / ".venv-nanochat" / "bin" / "python"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanod-bench"
RATIO = "vs_nanochat_tokens_per_sec_ratio"
STEP = re.compile(r"^step (\d+)/\d+ .*\| tok/sec: ([\d,]+)")
NANOCHAT_ARGS = ["--depth=2", "--head-dim=64", "--window-pattern=L", "--max-seq-len=128", "--device-batch-size=4",
                 "--total-batch-size=8192", "--save-every=-1", "--eval-every=-1", "--core-metric-every=-1",
                 "--sample-every=-1", "--run=dummy", "--model-tag=d2"]
BUILTIN_ARGS = ["--depth=2", "--head_dim=64", "--max_seq_len=128", "--device_batch_size=4",
                "--total_batch_size=8192", "--vocab_size=4096", "--save_every=-1"]


def missing() -> str | None:
    for part in ("head", "base-template"):
        if not (SRC / part).is_dir():
            return f"the real nanochat is not at {SRC / part} (set NANOCHAT_SRC to ../shared/nanochat's place)"
    if not os.access(NC_PYTHON, os.X_OK):
        return f"no interpreter for the real nanochat at {NC_PYTHON} (make nanochat-venv)"
    return None


class Run:
    """One trainer process: its step lines with their arrival times, and its stderr."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict, log: Path):
        self.name, self.steps, self.times, out = name, [], [], []
        with open(log, "w") as err:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            for line in proc.stdout:
                m = STEP.match(line)
                if m:
                    self.times.append(time.monotonic())
                    self.steps.append(float(m.group(2).replace(",", "")))
                else:
                    out.append(line)
            self.rc = proc.wait()
        self.log = "".join(out) + log.read_text(errors="replace")  # start-up lines: nanochat prints to stdout
        if self.rc != 0:
            raise RuntimeError(f"{name} exited {self.rc}: {self.log.strip().splitlines()[-1:] or '(no output)'}")

    def tok_per_sec(self, warmup: int) -> float:
        return statistics.median(self.steps[warmup:])

    def wall_tok_per_sec(self, warmup: int, tokens_per_step: int) -> float:
        """Steps after the warm-up over the wall time between their step lines."""
        t = self.times[warmup - 1:] if warmup > 0 else self.times
        return tokens_per_step * (len(t) - 1) / (t[-1] - t[0])


def check_same_shape(ours: str, theirs: str) -> str:
    """Depth, width and vocab from both trainers' start-up lines; raises on a mismatch."""
    m = re.search(r"(\d+) layers x (\d+) wide, ([\d,]+) params, vocab (\d+)", ours)
    n_layer, n_embd, vocab = (re.search(rf'"{k}": (\d+)', theirs) for k in ("n_layer", "n_embd", "vocab_size"))
    if not (m and n_layer and n_embd and vocab):
        raise RuntimeError("could not read the model shape from the trainers' logs")
    a = (int(m.group(1)), int(m.group(2)), int(m.group(4)))
    b = (int(n_layer.group(1)), int(n_embd.group(1)), int(vocab.group(1)))
    if a != b:
        raise RuntimeError(f"not the same shape: built-in (layers, width, vocab) {a}, nanochat {b}")
    total = re.search(r"total\s*: ([\d,]+)", theirs)
    return (f"{a[0]} layers x {a[1]} wide, vocab {a[2]}; parameters: built-in {m.group(3)}, "
            f"nanochat {total.group(1) if total else '?'} (value embeddings and scalars)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="step lines of each run left out (compile, warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs (ours, nanochat's)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both (the issue's 2)")
    ap.add_argument("--builtin-arg", action="append", default=[], help="an extra flag for the built-in trainer")
    ap.add_argument("--smoke", action="store_true", help="one short pair on one thread: checks that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.rounds, args.threads = 6, 2, 1, 1
    reason = missing()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        print(json.dumps({"name": RATIO, "median": None, "unit": "x", "target": 1.0, "skipped": reason}))
        return 0
    for sub in ("inductor", "triton", "tmp"):
        (CACHE / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"), "TRITON_CACHE_DIR": str(CACHE / "triton"),
           "TMPDIR": str(CACHE / "tmp")}
    for key in [k for k in env if k.startswith("NANOD_")]:
        del env[key]
    tokens = 8192
    with tempfile.TemporaryDirectory(prefix="nanod-bench-vs-nanochat-") as tmp:
        tmp = Path(tmp)
        nc = tmp / "nanochat"
        shutil.copytree(SRC / "head", nc, ignore=shutil.ignore_patterns("__pycache__", ".venv"))
        shutil.copytree(SRC / "base-template", tmp / "nc-base")
        for path in (tmp, *tmp.rglob("*")):  # the shared copy is read-only
            path.chmod(path.stat().st_mode | 0o200)
        data = tmp / "nc-base" / "base_data_climbmix"
        ours_env = {**env, "NANOCHAT_BASE_DIR": str(tmp / "ours")}
        theirs_env = {**env, "NANOCHAT_BASE_DIR": str(tmp / "nc-base"), "HF_DATASETS_CACHE": str(tmp / "nc-base/huggingface/datasets")}
        ours_argv = [sys.executable, "-m", "trainer", "base", *BUILTIN_ARGS, f"--data={data}",
                     f"--num_iterations={args.steps}", *args.builtin_arg]
        theirs_argv = [str(NC_PYTHON), "-m", "scripts.base_train", *NANOCHAT_ARGS, f"--num-iterations={args.steps}"]
        pairs = []
        try:
            for r in range(args.rounds):
                ours = Run("built-in trainer", ours_argv, ROOT, ours_env, tmp / f"ours-{r}.log")
                theirs = Run("nanochat base_train", theirs_argv, nc, theirs_env, tmp / f"nanochat-{r}.log")
                if r == 0:
                    print(check_same_shape(ours.log, theirs.log), file=sys.stderr)
                pairs.append([(x.tok_per_sec(args.warmup), x.wall_tok_per_sec(args.warmup, tokens)) for x in (ours, theirs)])
                (a, aw), (b, bw) = pairs[-1]
                print(f"pair {r + 1}: built-in {a:,.0f} tok/s, nanochat {b:,.0f} tok/s: {a / b:.3f}x "
                      f"(wall clock {aw / bw:.3f}x); load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    ratios = [a / b for (a, _), (b, _) in pairs]
    wall = [aw / bw for (_, aw), (_, bw) in pairs]
    print(f"{len(pairs)} pairs of {args.steps} steps, {args.threads} thread(s): ratio median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})", file=sys.stderr)
    print(json.dumps({"name": RATIO, "median": round(statistics.median(ratios), 3), "unit": "x", "target": 1.0,
                      "pairs": [round(x, 3) for x in ratios]}))
    print(json.dumps({"name": "vs_nanochat_wall_clock_ratio", "median": round(statistics.median(wall), 3), "unit": "x", "target": None}))
    print(json.dumps({"name": "builtin_tok_s_nanochat_shape", "median": round(statistics.median(p[0][0] for p in pairs)),
                      "unit": "tok/s", "target": None}))
    print(json.dumps({"name": "nanochat_base_train_tok_s", "median": round(statistics.median(p[1][0] for p in pairs)),
                      "unit": "tok/s", "target": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
