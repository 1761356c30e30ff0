"""The stand-in's training loops, one per phase script (not nanochat).

Each loop follows the control flow of the nanochat (92d63d4) script it stands in
for where nanod can see it: when it saves, which step number it saves under, what
its step line looks like, and where the step counter is incremented relative to
the print (base_train prints the index of the step just taken, chat_sft prints
after `step += 1`). Saving is the script's own `save_checkpoint(...)` call (passed
in as `save`), so that the script text shows which optimizer files it writes.
Everything else nanochat does is the real scripts' to show (tests/test_nanochat_real.py).
"""
from __future__ import annotations

import os
import sys
import time

from nanochat.standin import (base_dir, before_step, evaluate, fake_loss, load_checkpoint, load_model, print0,
                              step_stats, train_update, world_size)


def _model_config(cfg: dict, depth: int) -> dict:
    dim = depth * 64
    return {"sequence_len": cfg["max_seq_len"], "vocab_size": 65536, "n_layer": depth,
            "n_head": max(1, dim // 128), "n_kv_head": max(1, dim // 128), "n_embd": dim}


def run_base(cfg: dict, *, save) -> None:
    """scripts/base_train.py: save_every, resume_from_step, the `step N/M (p%)` line."""
    tag = cfg["model_tag"] or f"d{cfg['depth']}"
    ckpt_dir = os.path.join(base_dir(), "base_checkpoints", tag)
    resume = cfg["resume_from_step"]
    weights, loop_state = [0.5] * 8, {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0,
                                       "total_training_time": 0.0}
    start = 0
    if resume != -1:
        print0(f"Resuming optimization from step {resume}")
        for rank in range(world_size()):  # each rank loads its own optimizer shard
            weights, meta = load_checkpoint(ckpt_dir, resume, optim_rank=rank)
        start, loop_state = meta["step"], meta["loop_state"]
    total_batch_size = cfg["total_batch_size"]
    if total_batch_size == -1:  # "auto-computed optimal batch size"
        total_batch_size = 16 * cfg["max_seq_len"]
        print0(f"Auto-computed optimal batch size: {total_batch_size:,} tokens")
    if cfg["num_iterations"] > 0:
        num_iterations = cfg["num_iterations"]
        print0(f"Using user-provided number of iterations: {num_iterations:,}")
    else:
        num_iterations = int(cfg["target_param_data_ratio"] * cfg["depth"])
        print0(f"Calculated number of iterations from target data:param ratio: {num_iterations:,}")
    per_fwdbwd = cfg["device_batch_size"] * cfg["max_seq_len"] * world_size()
    assert total_batch_size % per_fwdbwd == 0, f"total_batch_size ({total_batch_size}) must be a multiple of {per_fwdbwd}."
    print0(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {total_batch_size // per_fwdbwd}")

    step = start
    while True:
        last_step = step == num_iterations
        every = cfg["eval_every"]
        if every > 0 and (last_step or step % every == 0):
            evaluate(step, "Validation bpb", fake_loss(step) / 3)
        if cfg["core_metric_every"] > 0 and (last_step or (step > 0 and step % cfg["core_metric_every"] == 0)):
            evaluate(step, "CORE metric", 0.1)
        every = cfg["sample_every"]
        if every > 0 and (last_step or (step > 0 and step % every == 0)):
            print0("<|bos|>The capital of France is Paris")
        if last_step or (step > 0 and step != resume and cfg["save_every"] > 0 and step % cfg["save_every"] == 0):
            meta = {"step": step, "val_bpb": fake_loss(step) / 3, "model_config": _model_config(cfg, cfg["depth"]),
                    "user_config": cfg, "device_batch_size": cfg["device_batch_size"],
                    "max_seq_len": cfg["max_seq_len"],
                    "dataloader_state_dict": {"pq_idx": step // 100, "rg_idx": step % 100},
                    "loop_state": loop_state, "total_batch_size": total_batch_size}
            save(ckpt_dir, step, weights, meta)
        if last_step:
            break
        t0 = time.time()
        before_step(step, cfg["device_batch_size"], sys.argv[0])
        weights = train_update(weights, step)
        dt, tok = step_stats(total_batch_size, t0)
        loop_state["total_training_time"] += dt
        pct = 100 * step / num_iterations
        minutes = loop_state["total_training_time"] / 60
        print0(f"step {step:05d}/{num_iterations:05d} ({pct:.2f}%) | loss: {fake_loss(step):.6f} | lrm: 1.00 | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {tok:,} | bf16_mfu: 1.00 | epoch: 0 pq: {step // 100} "
               f"rg: {step % 100} | total time: {minutes:.2f}m | eta: 1.0m")
        step += 1
    print0(f"Total training time: {loop_state['total_training_time'] / 60:.2f}m")


def run_sft(cfg: dict, *, save) -> None:
    """scripts/chat_sft.py: no resume, saves once at its last step."""
    weights, meta = load_model("base", cfg["model_tag"], cfg["model_step"], optim=bool(cfg["load_optimizer"]))
    depth = meta["model_config"]["n_layer"]
    tag = cfg["model_tag"] or f"d{depth}"
    num_iterations = cfg["num_iterations"] if cfg["num_iterations"] > 0 else 20  # "full epoch"
    dbs = cfg["device_batch_size"] or meta.get("device_batch_size") or 1
    step, total_time = 0, 0.0
    while True:
        last_step = step >= num_iterations
        if last_step or (cfg["eval_every"] > 0 and step % cfg["eval_every"] == 0):
            evaluate(step, "Validation bpb", fake_loss(step, 1.5) / 3)
        if last_step:
            meta = {"step": step, "val_bpb": 0.5, "model_config": _model_config(cfg | {"max_seq_len": 2048}, depth),
                    "user_config": cfg}
            save(os.path.join(base_dir(), "chatsft_checkpoints", tag), step, weights, meta)
            break
        t0 = time.time()
        before_step(step, dbs, sys.argv[0])
        weights = train_update(weights, step)
        dt, tok = step_stats(65536, t0)
        total_time += dt
        step += 1
        print0(f"step {step:05d} ({100 * step / num_iterations:.2f}%) | loss: {fake_loss(step, 1.5):.6f} | lrm: 1.00 | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {tok:,} | mfu: 1.00 | epoch: 0 | total time: {total_time / 60:.2f}m")
