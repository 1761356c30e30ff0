"""device_batch_size: auto: the largest device_batch_size that fits, found before the first step.

The candidates are the values that keep total_batch_size divisible
(options.batch_candidates: the divisors of a rank's rows per step, so never more
rows than a step has). The search bisects that list, first probe in its middle;
whether a candidate fits is assumed monotonic in the batch.

One probe is what a training step costs at its peak: forward and backward,
the optimizer step (its state is allocated lazily, at the first step), then a
second forward and backward while the gradients and that state exist (a step of
grad_accum >= 2 micro-batches looks like this), and a second optimizer step.
The rows are zeros made on the device: nothing is read from the data loader.

- On CUDA a candidate fits when it ran without a real out-of-memory error and
  its peak reserved memory (`torch.cuda.max_memory_reserved` after
  `reset_peak_memory_stats`), plus what was in use outside the caching allocator
  when the search began (the CUDA context, other processes: total - free -
  reserved by `torch.cuda.mem_get_info`), stays within the target share of the
  card (NANOD_AUTOFIT_TARGET, default 0.88 of the total, or of the smaller card
  NANOD_FAULT_VRAM_GB simulates): what nvidia-smi would show on that card.
  Memory is released after each probe. With a total batch of 2^k rows the
  candidates are powers of two, so the use lands anywhere between about half the
  target and the target; a total with a factor 3 gives finer steps.
- On the CPU (and MPS) a probe runs only under NANOD_FAULT_OOM_ABOVE (the
  simulated small card, raised at the forward as in training), so the search
  lands on that value. Without it there is no memory limit worth finding: the
  choice is the largest candidate at most the phase's default (base 32, sft 4),
  without a probe.
- Under torchrun every rank probes the same candidate and the ranks agree
  (all fit, or none), so they choose one value.

Promise 16 (changes memory, never the optimisation): the probes train the real
model with the real optimizer, so afterwards the weights are put back from a copy
taken before, the optimizer is built anew (no state, as at a fresh start), and
the torch and CUDA RNG states are restored; then resume or init loads as usual.
The weights after a run that chose B are bitwise those of a run given B
(tests/test_trainer_autofit.py). What is chosen is printed in one line on stderr,
`auto-fit: device_batch_size 8 (probed 16 no, 8 yes, 12 no in 3.1s; peak 6.9/8.0
GiB = 86%)`, which the daemon reads, and kept in the meta (`nanod.autofit`).
A resume reuses its checkpoint's value without probing (trainer/setup.py).
"""
from __future__ import annotations

import gc
import os
import time

import torch

from trainer.options import autofit_target, default_batch_choice

GIB = 2 ** 30
OTHER_OOM_WORDS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def fit_batch(t) -> None:
    """Choose the plan's device_batch_size for Trainer `t` (before resume/init loads anything), or say
    that a resume reuses its checkpoint's."""
    plan, device = t.plan, t.device
    if plan.device_batch_size is not None:
        t.note(f"auto-fit: device_batch_size {plan.device_batch_size} (the checkpoint's, step "
               f"{plan.autofit['reused_from_step']}: a resume does not probe again)")
        return
    candidates = plan.autofit["candidates"]
    t0 = time.monotonic()
    if device.type != "cuda" and t.faults.oom_above is None:
        chosen = default_batch_choice(plan.phase, candidates)
        record = {"how": "default", "chosen": chosen, "probes": [], "seconds": 0.0}
        plan.set_batch(chosen)
        plan.autofit = record
        t.note(f"auto-fit: device_batch_size {chosen} (not probed: the {device.type} has no memory limit to find; "
               f"the largest that divides the step's {candidates[-1]} rows, up to {plan.phase}'s default)")
        return
    target = autofit_target(os.environ)
    card = others = budget = None
    if device.type == "cuda":
        card, others = card_bytes(device, t.faults)
        budget = int(target * card) - others   # what the card shows in use stays within the target
    weights = {k: v.detach().to("cpu", copy=True) for k, v in t.model.state_dict().items()}
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    probes: list[list] = []

    def fits(batch: int) -> bool:
        ok, peak = probe(t, batch, budget)
        ok = t.group.all(ok)   # every rank the same answer
        probes.append([batch, ok, peak])
        return ok

    try:
        chosen = bisect_largest(candidates, fits)
    finally:
        # promise 16: as a fresh start would be
        t.model.load_state_dict(weights)
        t.optim = t.build_optimizer()
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, device)
        del weights
        release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    seconds = time.monotonic() - t0
    said = ", ".join(f"{b} {'yes' if ok else 'no'}" for b, ok, _ in probes)
    peak = next((p for b, ok, p in probes if b == chosen), None)
    used = peak + others if peak is not None and others is not None else None
    record = {"how": "probed", "chosen": chosen, "probes": probes, "seconds": round(seconds, 3),
              "target": target, "card_bytes": card, "others_bytes": others, "peak_bytes": peak,
              "peak_frac": round(used / card, 4) if used and card else None}
    if card:
        ours = f", {others / GIB:.1f} of it not the allocator's" if others else ""
        limit = f"peak {used / GIB:.1f}/{card / GIB:.1f} GiB = {100 * used / card:.0f}%{ours}" if used else \
            f"target {100 * target:.0f}% of {card / GIB:.1f} GiB"
    else:
        limit = f"{device.type}: NANOD_FAULT_OOM_ABOVE={t.faults.oom_above} is the limit"
    if chosen is None:
        t.note(f"auto-fit: no device_batch_size fits (probed {said} in {seconds:.1f}s; {limit})")
        raise torch.OutOfMemoryError(f"auto-fit: even device_batch_size {candidates[0]} does not fit")
    plan.set_batch(chosen)
    plan.autofit = record
    t.note(f"auto-fit: device_batch_size {chosen} (probed {said} in {seconds:.1f}s; {limit})")


def bisect_largest(candidates: list[int], fits) -> int | None:
    """The largest candidate (sorted, smallest first) for which fits() is true, or None;
    each candidate is asked at most once, the first in the middle of the list."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi + 1) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def card_bytes(device, faults) -> tuple[int, int]:
    """(the card's memory, or the smaller card NANOD_FAULT_VRAM_GB simulates on it; what is in use
    outside this process's caching allocator now: its CUDA context, other processes)."""
    free, total = torch.cuda.mem_get_info(device)
    others = max(0, total - free - torch.cuda.memory_reserved(device))
    if faults.vram_gb is not None:
        total = min(total, int(faults.vram_gb * GIB))
    return total, others


def probe(t, batch: int, budget: int | None) -> tuple[bool, int | None]:
    """(fits, peak reserved bytes on CUDA) for one candidate; a real or simulated OOM does not fit."""
    device = t.device
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _micro_steps(t, batch)
        out_of_memory = False
    except torch.OutOfMemoryError:
        out_of_memory = True
    except RuntimeError as e:   # cuBLAS/cuDNN say it in their own words when their workspace does not fit
        if not any(words in str(e) for words in OTHER_OOM_WORDS):
            raise
        out_of_memory = True
    peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    t.optim.zero_grad()
    release(device)
    fits = not out_of_memory and (budget is None or peak is None or peak <= budget)
    return fits, peak


def _micro_steps(t, batch: int) -> None:
    """Two micro-batches of zeros with an optimizer step after each (the second runs beside the state)."""
    # two tensors, as in training: a compiled model guards on its inputs aliasing each other
    x = torch.zeros((batch, t.plan.seq_len), dtype=torch.long, device=t.device)
    y = torch.zeros_like(x)
    for _ in range(2):
        t.faults.before_forward(batch)
        with t.autocast:
            loss = t.loss_of(x, y) / y.numel()
        loss.backward()
        del loss
        t.optim.step()
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

