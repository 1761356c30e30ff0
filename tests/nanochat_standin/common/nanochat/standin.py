"""The shared engine of the nanochat STAND-IN (not nanochat; no torch, no model).

It behaves like nanochat's training scripts in what nanod can observe: step lines
on stdout (block-buffered unless PYTHONUNBUFFERED, as any Python's), coloured
"Saved ... to:" log lines on stderr, the checkpoint layout under NANOCHAT_BASE_DIR
written non-atomically in nanochat's order (model, meta, then each rank's optim),
resume checks, OOM tracebacks and exit codes. See ../README.md for the nanochat
commits it mimics. Knobs (environment):

  STANDIN_STEP_SECONDS     sleep per optimizer step (0.02)
  STANDIN_STARTUP_SECONDS  sleep before step 0 (torch.compile on a cold cache) (0)
  STANDIN_EVAL_SECONDS     sleep per evaluation (silent stretches) (0)
  STANDIN_SAVE_SECONDS     sleep between the files of a save and inside the model write (0)
  STANDIN_MODEL_BYTES      size of a model file (4096)
  STANDIN_OOM_ABOVE=B      device_batch_size > B: an OOM traceback on stderr, exit 1
  STANDIN_OOM_TEXT         "torch" (default) or "driver": which OOM message
  STANDIN_CRASH_AT_STEP=S  raise at step S; STANDIN_HANG_AT_STEP=S: hang at step S
  STANDIN_FAULT_ONCE=PATH  crash/hang only while PATH does not exist (it is created then)
  STANDIN_WORLD_SIZE       ranks to write optimizer files for (else WORLD_SIZE, else 1)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime

END = b"\nEND-OF-MODEL\n"  # a model file without it is torn (torch.load would fail on it)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def print0(*a) -> None:
    print(*a)  # deliberately no flush: stdout into a file is block-buffered


def log_info(name: str, message: str) -> None:
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    print(f"{stamp} - {name} - \033[32m\033[1mINFO\033[0m - {message}", file=sys.stderr, flush=True)


def base_dir() -> str:
    return os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")


def world_size() -> int:
    return int(os.environ.get("STANDIN_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def announce(era: str) -> None:
    """The argv this launch got, for tests that check relaunches repeat their arguments."""
    print(f"standin[{era}] argv: {json.dumps(sys.argv[1:])}", file=sys.stderr, flush=True)
    time.sleep(env_float("STANDIN_STARTUP_SECONDS", 0))


# ---- faults ---------------------------------------------------------------------------

def _fault_armed() -> bool:
    marker = os.environ.get("STANDIN_FAULT_ONCE")
    if not marker:
        return True
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


def before_step(step: int, device_batch_size: int, script: str) -> None:
    limit = os.environ.get("STANDIN_OOM_ABOVE")
    if limit is not None and device_batch_size > int(limit):
        if os.environ.get("STANDIN_OOM_TEXT") == "driver":
            last = "RuntimeError: CUDA driver error: out of memory"
        else:
            last = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a "
                    "total capacity of 7.63 GiB of which 412.00 MiB is free. (stand-in: device_batch_size "
                    f"{device_batch_size} > {limit})")
        sys.stdout.flush()
        print("Traceback (most recent call last):\n"
              f'  File "{script}", line 1, in <module>\n'
              "    loss = model(x, y)\n" + last, file=sys.stderr, flush=True)
        sys.exit(1)
    if os.environ.get("STANDIN_CRASH_AT_STEP") == str(step) and _fault_armed():
        sys.stdout.flush()
        raise RuntimeError(f"stand-in crash at step {step}")
    if os.environ.get("STANDIN_HANG_AT_STEP") == str(step) and _fault_armed():
        while True:  # what was printed stays in stdout's buffer, as in a real hang
            time.sleep(3600)
    time.sleep(env_float("STANDIN_STEP_SECONDS", 0.02))


def evaluate(step: int, what: str, value: float) -> None:
    time.sleep(env_float("STANDIN_EVAL_SECONDS", 0))
    print0(f"Step {step:05d} | {what}: {value:.6f}")


# ---- checkpoints ----------------------------------------------------------------------

def save_checkpoint(ckpt_dir: str, step: int, weights: list[float], optimizer_data, meta: dict,
                    rank: int | None = None) -> None:
    """nanochat's order and its lack of atomicity: straight to the final names.

    Like nanochat's: no optimizer file when optimizer_data is None; called without
    `rank` (a master-only save) it writes rank 0's only; with `rank` every rank
    writes its own, which this single process does for all of them.
    """
    optim_ranks = 0 if optimizer_data is None else (1 if rank is None else world_size())
    pause = env_float("STANDIN_SAVE_SECONDS", 0)
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, f"model_{step:06d}.pt")
    body = json.dumps({"step": step, "weights": weights}).encode()
    size = max(int(env_float("STANDIN_MODEL_BYTES", 4096)), len(body) + 64)
    body = body + b" " * (size - len(body) - len(END)) + END
    with open(path, "wb") as f:
        half = len(body) // 2
        f.write(body[:half])
        f.flush()
        time.sleep(pause)  # a kill -9 here leaves a torn model file
        f.write(body[half:])
    log_info("nanochat.checkpoint_manager", f"Saved model parameters to: {path}")
    time.sleep(pause)
    path = os.path.join(ckpt_dir, f"meta_{step:06d}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    log_info("nanochat.checkpoint_manager", f"Saved metadata to: {path}")
    for rank in range(optim_ranks):
        time.sleep(pause)
        path = os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank:d}.pt")
        with open(path, "wb") as f:
            f.write(json.dumps({"step": step, "rank": rank, "momentum": weights}).encode())
        log_info("nanochat.checkpoint_manager", f"Saved optimizer state to: {path}")


def find_last_step(ckpt_dir: str) -> int:
    """As nanochat does it: the newest model file, complete or not."""
    steps = [int(n[6:12]) for n in os.listdir(ckpt_dir) if n.startswith("model_") and n.endswith(".pt")]
    if not steps:
        raise FileNotFoundError(f"No checkpoints found in {ckpt_dir}")
    return max(steps)


def load_checkpoint(ckpt_dir: str, step: int, *, optim_rank: int | None) -> tuple[list[float], dict]:
    """Fails as torch.load would on a missing or torn file, and on a torn meta."""
    with open(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), "rb") as f:
        raw = f.read()
    if not raw.endswith(END):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    weights = json.loads(raw[: raw.index(b"}") + 1])["weights"]
    if optim_rank is not None:
        with open(os.path.join(ckpt_dir, f"optim_{step:06d}_rank{optim_rank:d}.pt"), "rb") as f:
            json.loads(f.read())
    with open(os.path.join(ckpt_dir, f"meta_{step:06d}.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return weights, meta


def load_model(source: str, model_tag: str | None, step: int | None, *, optim: bool) -> tuple[list[float], dict]:
    """Load the input checkpoint of mid/sft, nanochat-style (newest model file when no step)."""
    root = os.path.join(base_dir(), {"base": "base_checkpoints", "mid": "mid_checkpoints"}[source])
    if model_tag is None:
        tags = sorted(os.listdir(root)) if os.path.isdir(root) else []
        if not tags:
            raise FileNotFoundError(f"No checkpoints found in {root}")
        model_tag = tags[-1]
    ckpt_dir = os.path.join(root, model_tag)
    if step is None:
        step = find_last_step(ckpt_dir)
    print0(f"Loading model from {ckpt_dir} with step {step}")
    return load_checkpoint(ckpt_dir, step, optim_rank=0 if optim else None)


def train_update(weights: list[float], step: int) -> list[float]:
    """A deterministic stand-in for one optimizer step."""
    return [round(w * 0.99 + 0.001 * math.sin(step + i), 12) for i, w in enumerate(weights)]


def fake_loss(step: int, start: float = 4.0) -> float:
    return start / (1.0 + 0.02 * step)


def step_stats(total_batch_size: int, t0: float) -> tuple[float, int]:
    dt = max(time.time() - t0, 1e-6)
    return dt, int(total_batch_size / dt)
