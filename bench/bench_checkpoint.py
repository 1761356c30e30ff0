"""How long a checkpoint save blocks the training loop: nanod's async save vs a synchronous one.

A real GPT and its Muon/AdamW state (>= 200 MB of float32 on the CPU) are
saved both ways into a directory on the disk checkpoints would use.
Synchronous: the loop waits for the whole `write_checkpoint` (each file to a
temp name, fsync, rename, meta last). Async, as the trainer does it: the loop
hands references to the writer thread (`CheckpointWriter.submit`), runs the
next forward/backward while the thread copies the tensors into CPU buffers, and
waits for that copy only before the next optimizer step (`wait_copied`); the
write happens after. Blocking = submit + that wait. Medians over several runs;
the figure is their ratio (target <= 0.10, DESIGN.md performance table).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.checkpoint import CheckpointWriter, write_checkpoint
from trainer.model import GPT, config_for_depth
from trainer.optim import build_optimizers

TARGET = 0.10


def forward_backward(model, vocab: int, seq: int) -> None:
    x = torch.randint(0, vocab, (2, seq))
    loss = F.cross_entropy(model(x).view(-1, vocab), x.view(-1))
    loss.backward()


def state_mib(model_sd: dict, payload: dict) -> float:
    def count(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(count(v) for v in obj.values())
        return sum(count(v) for v in obj) if isinstance(obj, (list, tuple)) else 0
    return (count(model_sd) + count(payload)) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="bench/results", help="where to write (the disk checkpoints would go to)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the figure is about blocking, not speed; one thread is steadier on a busy machine
    seq = 64
    model = GPT(config_for_depth(args.depth, vocab_size=args.vocab, sequence_len=seq))
    model.init_weights()
    optim = build_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0,
                             betas=(0.8, 0.95), init_lr_frac=1.0)
    forward_backward(model, args.vocab, seq)
    optim.step()  # the optimizer state exists from the first step on
    optim.zero_grad()
    payload = lambda: {"optimizer": optim.state_dict(), "rng": {"torch": torch.get_rng_state(), "cuda": []}}
    mib = state_mib(model.state_dict(), payload())
    meta = {"step": 0, "nanod": {"format": 1, "optim_ranks": 1, "phase": "bench"}}
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    sync_s, async_s, write_s = [], [], []
    with tempfile.TemporaryDirectory(prefix="nanod-bench-ckpt-", dir=args.dir) as tmp:
        d = Path(tmp)
        writer = CheckpointWriter(should_abort=lambda: False)
        for run in range(args.runs + 1):  # run 0 warms the writer's buffers, as a trainer's first save does
            t0 = time.perf_counter()
            write_checkpoint(d / "sync", run, model.state_dict(), payload(), meta)
            sync = time.perf_counter() - t0

            t0 = time.perf_counter()
            writer.submit(d / "async", run, model.state_dict(), payload(), dict(meta))
            blocked = time.perf_counter() - t0
            forward_backward(model, args.vocab, seq)  # the next step's work, overlapping the copy
            t1 = time.perf_counter()
            writer.wait_copied()
            blocked += time.perf_counter() - t1
            optim.step()
            optim.zero_grad()
            writer.wait()  # not loop time: the next save is save_every steps away
            if run:
                sync_s.append(sync)
                async_s.append(blocked)
                write_s.append(time.perf_counter() - t0)
            shutil.rmtree(d / "sync")
            shutil.rmtree(d / "async")
    sync_m, async_m = statistics.median(sync_s), statistics.median(async_s)
    ratio = async_m / sync_m
    print(f"state {mib:.0f} MiB, {args.runs} runs: synchronous save blocks the loop {sync_m * 1000:.0f} ms, "
          f"async {async_m * 1000:.1f} ms (copy overlapped with a forward/backward; the whole background save "
          f"took {statistics.median(write_s) * 1000:.0f} ms); ratio {ratio:.3f} (target <= {TARGET})", file=sys.stderr)
    print(json.dumps({"name": "checkpoint_async_vs_sync_blocking", "median": round(ratio, 4), "unit": "ratio",
                      "target": TARGET, "async_ms": round(async_m * 1000, 2), "sync_ms": round(sync_m * 1000, 1),
                      "state_mib": round(mib)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
