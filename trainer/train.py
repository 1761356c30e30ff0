"""The training loop for base, mid and sft: schedule, grad accumulation, step lines, saves, signals, OOM.

One optimizer step = grad_accum forward/backward passes of device_batch_size
rows; the loss of each pass is summed over its target tokens and divided by
the target tokens of the whole step, so the gradient does not depend on how
the step is split (promise 4). After optimizer step k (0-based) completes, the
step line for k is printed and checkpoint step k+1 may be saved; the final
checkpoint is step num_iterations.

Signals only set a flag (StopFlag); the loop finishes the step it is in, saves
an emergency checkpoint at the current step, waits for it and exits
INTERRUPTED. A second signal exits at once without saving. An out-of-memory
error releases memory and exits OOM with one line naming device_batch_size.

Under torchrun (trainer/distributed.py) the ranks are data-parallel replicas.
Every rank reads the same global stream of rows; each pass takes world_size x
device_batch_size rows and rank r trains on the r-th device_batch_size of them,
so the ranks' rows are disjoint and the data position in the meta is one global
position. Each rank's loss is summed over its targets and divided by the
target count of the whole step (all ranks), so the summed gradient is the
one-process gradient up to summation order. The ranks agree at each step
whether to stop (any rank signalled) and, after the passes, whether any rank
ran out of memory (then all exit OOM, so the daemon backs off for all). Rank 0
prints the step lines and notes; every rank saves its part of a checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch

from trainer import exitcodes, layout
from trainer.autofit import fit_batch
from trainer.checkpoint import CheckpointWriter, DiskWaitAborted, remove_stale_temps, wait_for_disk
from trainer.data import SFTLoader, StreamLoader
from trainer.distributed import Group, pick_device
from trainer.faults import Faults
from trainer.host_alloc import keep_freed_blocks
from trainer.model import GPT
from trainer.options import AUTO
from trainer.optim import build_optimizers
from trainer.setup import Plan
from trainer.signals import StopFlag

MUON_MOMENTUM_WARMUP = 300  # steps over which Muon's momentum rises 0.85 -> 0.95 (base and mid)


def lr_multiplier(step: int, n: int, s: dict) -> float:
    warmup, warmdown = round(s["warmup_ratio"] * n), round(s["warmdown_ratio"] * n)
    if step < warmup:
        return (step + 1) / warmup
    if step <= n - warmdown:
        return 1.0
    progress = (n - step) / warmdown
    return progress + (1 - progress) * s["final_lr_frac"]


def muon_momentum(step: int, phase: str) -> float:
    if phase == "sft":
        return 0.95
    frac = min(step / MUON_MOMENTUM_WARMUP, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


class Trainer:
    def __init__(self, plan: Plan, stop: StopFlag, faults: Faults, group: Group | None = None):
        self.plan, self.stop, self.faults = plan, stop, faults
        self.group = group = group or Group()
        o = plan.opts
        self.device = group.device or pick_device(o.device_type)
        cuda = self.device.type == "cuda"
        if self.device.type == "cpu":
            keep_freed_blocks()  # before the model exists: each CPU step reuses its memory instead of faulting it in
        faults.limit_vram(self.device)
        torch.manual_seed(o.seed)
        with torch.device(self.device):
            model = GPT(plan.model_config)
        model.init_weights()
        self.model = model
        self.optim = self.build_optimizer()
        use_compile = o.compile == "1" or (o.compile == "auto" and cuda)
        if use_compile and os.environ.get("TORCH_COMPILE_DISABLE") != "1":
            # model(x, y): the loss inside the graph, as nanochat compiles it, so softcap and
            # cross-entropy fuse with the head instead of running eagerly on the logits
            self.loss_of = torch.compile(model, dynamic=False)
        else:
            # eager: on the CPU the chunked head+loss (no whole logits tensor); elsewhere the plain one
            self.loss_of = functools.partial(model, fused=self.device.type == "cpu")
        self.autocast = (torch.amp.autocast("cuda", dtype=getattr(torch, o.dtype))
                         if cuda and o.dtype != "float32" else nullcontext())
        if plan.opts.device_batch_size == AUTO:
            # device_batch_size: auto, probed with the real model and step before anything is loaded;
            # it leaves weights, optimizer and RNG as they were (trainer/autofit.py)
            fit_batch(self)
        self.loop_state = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "last_loss": None}
        data_state = None
        if plan.resume:
            r = plan.resume
            model.load_state_dict(r["model"])
            self.optim.load_state_dict(r["optim"]["optimizer"])
            rng = r["optim"].get("rng") or {}
            if isinstance(rng.get("torch"), torch.Tensor):
                torch.set_rng_state(rng["torch"])
            if cuda and rng.get("cuda"):
                # this rank's own GPU only: touching the others would open a CUDA context on each of them
                torch.cuda.set_rng_state(rng["cuda"][0], self.device)
            data_state = r["meta"].get("dataloader_state_dict")
            self.loop_state.update(r["meta"].get("loop_state") or {})
            self.note(f"resumed from step {r['step']} ({layout.model_path(r['dir'], r['step'])})")
        elif plan.init:
            i = plan.init
            model.load_state_dict(i["model"])
            self.note(f"initialised from {i['phase']} step {i['step']} ({layout.model_path(i['dir'], i['step'])})")
        # every replica starts from rank 0's weights, whatever each rank initialised or loaded
        group.broadcast_(list(model.state_dict().values()))
        self.init_from = ({"phase": plan.init["phase"], "step": plan.init["step"]} if plan.init
                          else (plan.resume["meta"].get("nanod") or {}).get("init_from") if plan.resume else None)
        plan.resume = plan.init = None  # the loaded state dicts are not needed any more
        loader_cls = SFTLoader if plan.phase == "sft" else StreamLoader
        self.loader = loader_cls(plan.source, plan.tok, plan.seq_len, data_state)
        self.writer = CheckpointWriter(should_abort=stop.requested, slow_ms=faults.slow_save_ms, group=group)
        self.step = plan.start_step
        self.last_save_time = time.monotonic()
        self.saved_steps = {plan.start_step} if plan.start_step else set()

    def build_optimizer(self):
        o = self.plan.opts
        return build_optimizers(self.model, embedding_lr=o.embedding_lr, unembedding_lr=o.unembedding_lr,
                                matrix_lr=o.matrix_lr, weight_decay=o.weight_decay,
                                betas=(o.adam_beta1, o.adam_beta2), init_lr_frac=self.plan.schedule["init_lr_frac"])

    def note(self, message: str) -> None:
        """A line on stderr, from rank 0 only (the others would repeat it)."""
        if self.group.is_main:
            print(message, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> float:
        p, group = self.plan, self.group
        lrm = lr_multiplier(self.step, p.num_iterations, p.schedule)
        self.optim.set_lr_multiplier(lrm)
        self.optim.set_muon_momentum(muon_momentum(self.step, p.phase))
        B, first = p.device_batch_size, group.rank * p.device_batch_size
        # every rank reads the step's rows of all ranks: the target count is global, the position one
        batches = [self.loader.next_batch(group.world_size * B) for _ in range(p.grad_accum)]
        n_targets = max(1, sum(int((y != -1).sum()) for _, y in batches))
        total = torch.zeros((), device=self.device)
        try:
            for x, y in batches:
                x, y = x[first:first + B], y[first:first + B]
                self.faults.before_forward(B)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.autocast:
                    loss = self.loss_of(x, y) / n_targets
                loss.backward()
                total += loss.detach()
                del loss
            out_of_memory = None
        except torch.OutOfMemoryError as e:
            if not group.active:
                raise
            out_of_memory = e
            self.optim.zero_grad()
        if group.any(out_of_memory is not None):  # one rank out of memory: all back off together
            raise out_of_memory or torch.OutOfMemoryError(f"another rank ran out of memory at step {self.step}")
        grads = [q.grad for q in self.model.parameters() if q.grad is not None]
        group.sum_(grads + [total.view(1)])
        if p.opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.opts.grad_clip)
        self.writer.wait_copied()  # a save in flight must have its copy before the weights move
        self.optim.step()
        self.optim.zero_grad()
        self.lrm = lrm
        return float(total)

    def print_step_line(self, k: int, loss: float, dt: float) -> None:
        p = self.plan
        tokens = p.total_batch_size
        line = (f"step {k:05d}/{p.num_iterations:05d} ({100 * k / p.num_iterations:.2f}%) | loss: {loss:.6f} | "
                f"lrm: {self.lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {int(tokens / max(dt, 1e-9)):,}")
        if self.device.type == "cuda":
            line += f" | peak_mem: {torch.cuda.max_memory_allocated() / 2**30:.2f}GiB"
        if self.group.is_main:
            print(line, flush=True)

    # ------------------------------------------------------------------ saving
    def meta(self) -> dict:
        p = self.plan
        meta = {
            "step": self.step,
            "val_bpb": None,  # nanod runs no evaluation
            "model_config": p.model_config.to_dict(),
            "user_config": dataclasses.asdict(p.opts),
            "device_batch_size": p.device_batch_size,
            "max_seq_len": p.seq_len if p.phase != "sft" else p.model_config.sequence_len,
            "total_batch_size": p.total_batch_size,
            "grad_accum_steps": p.grad_accum,
            "num_iterations": p.num_iterations,
            "schedule": {**p.schedule, "muon_momentum_warmup": 0 if p.phase == "sft" else MUON_MOMENTUM_WARMUP},
            "dataloader_state_dict": self.loader.state_dict(),
            "loop_state": dict(self.loop_state),
            "nanod": {"format": 1, "optim_ranks": p.world_size, "world_size": p.world_size, "phase": p.phase,
                      "model_tag": p.model_tag, "flags_given": p.given, "init_from": self.init_from,
                      "data": str(p.data_path), "seed": p.opts.seed},
        }
        if p.autofit:  # device_batch_size: auto: what was probed and chosen (the chosen value is device_batch_size)
            meta["nanod"]["autofit"] = p.autofit
        if p.phase == "sft":
            meta["max_tokens"] = p.seq_len
        return meta

    def save(self, *, wait: bool) -> None:
        """Hand the state to the writer thread; the loop waits for the copy only at the next optimizer step."""
        self.writer.wait()
        p = self.plan
        estimate = self.writer.last_bytes or 3 * sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        wait_for_disk(p.ckpt_dir, self.step, estimate, self.stop.requested)
        rng = {"torch": torch.get_rng_state(),
               "cuda": [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []}
        # the optimizer is replicated: rank 0's file holds it whole; another rank's holds its own RNG
        main = self.group.is_main
        payload = {"optimizer": self.optim.state_dict(), "rng": rng} if main else {"rank": self.group.rank, "rng": rng}
        # references only: the writer copies them before the next optimizer step changes them
        self.writer.submit(p.ckpt_dir, self.step, self.model.state_dict() if main else None, payload, self.meta())
        self.saved_steps.add(self.step)
        self.last_save_time = time.monotonic()
        if wait:
            self.writer.wait()

    def save_due(self) -> bool:
        o = self.plan.opts
        if self.step >= self.plan.num_iterations:
            return False
        if o.save_every > 0 and self.step % o.save_every == 0:
            return True
        return o.save_every_minutes > 0 and time.monotonic() - self.last_save_time >= o.save_every_minutes * 60

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        p = self.plan
        p.ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(p.ckpt_dir)
        ranks = f"{p.world_size} ranks x " if p.world_size > 1 else ""
        where = f"{p.world_size} ranks on {self.group.backend}, rank 0 on {self.device}" if p.world_size > 1 \
            else f"device {self.device}"
        self.note(f"{p.phase}: {p.model_config.n_layer} layers x {p.model_config.n_embd} wide, "
                  f"{self.model.num_params():,} params, vocab {p.model_config.vocab_size}; "
                  f"{p.num_iterations} steps of {p.total_batch_size:,} tokens = {p.grad_accum} x {ranks}"
                  f"{p.device_batch_size} rows x {p.seq_len}; {where}; checkpoints {p.ckpt_dir}")
        try:
            while self.step < p.num_iterations:
                # faults first: a hang must not answer a SIGTERM that is already pending
                self.faults.before_step(self.step, p.device_batch_size)
                if self.group.any(self.stop.requested()):  # every rank stops at the same step
                    return self.stop_now()
                t0 = time.perf_counter()
                loss = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.step += 1
                if not math.isfinite(loss):
                    raise RuntimeError(f"loss is {loss} at step {self.step - 1}")
                ls = self.loop_state
                ls["smooth_train_loss"] = 0.9 * ls["smooth_train_loss"] + 0.1 * loss
                ls["total_training_time"] += dt
                ls["last_loss"] = loss
                self.print_step_line(self.step - 1, loss, dt)
                if self.save_due():
                    self.save(wait=False)
            # the final checkpoint, saved and waited for before anything else happens
            if self.step not in self.saved_steps:
                self.save(wait=True)
            self.writer.wait()
        except torch.OutOfMemoryError:
            failed = True
        except DiskWaitAborted as e:
            print(f"interrupted: {e}", file=sys.stderr, flush=True)
            return exitcodes.INTERRUPTED
        else:
            failed = False
        if failed:
            return self.release_after_oom()
        self.note(f"{p.phase} complete: step {self.step} saved in {p.ckpt_dir}")
        return exitcodes.OK

    def stop_now(self) -> int:
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "another rank's signal"
        try:
            self.writer.wait()  # a save in flight lands first (under torchrun, every rank's writer together)
            done = self.step in self.saved_steps and layout.is_complete(self.plan.ckpt_dir, self.step)
            if not self.group.all(done):  # every rank saves, or none does
                self.save(wait=True)
        except DiskWaitAborted as e:
            print(f"interrupted by {name}: {e}", file=sys.stderr, flush=True)
            return exitcodes.INTERRUPTED
        self.note(f"interrupted by {name}: emergency checkpoint step {self.step} saved in {self.plan.ckpt_dir}")
        return exitcodes.INTERRUPTED

    def release_after_oom(self) -> int:
        self.optim.zero_grad()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.writer.wait()  # a save in flight is still good: let it finish
        except Exception as e:
            print(f"warning: the checkpoint being written failed: {e}", file=sys.stderr, flush=True)
        p = self.plan
        print(f"out of memory at step {self.step} with device_batch_size={p.device_batch_size}: retry with a smaller "
              f"--device_batch_size (total_batch_size {p.total_batch_size} is kept by gradient accumulation)",
              file=sys.stderr, flush=True)
        return exitcodes.OOM
