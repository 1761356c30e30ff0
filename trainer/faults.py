"""Fault injection from NANOD_FAULT_* variables, for tests and for users' own drills.

    NANOD_FAULT_OOM_ABOVE=B       every step with device_batch_size > B raises torch.OutOfMemoryError,
                                  on every attempt (a simulated small card); auto-fit's probes too, so
                                  --device_batch_size=auto lands on B (the largest candidate <= B)
    NANOD_FAULT_CRASH_AT_STEP=S   raise an uncaught RuntimeError before optimizer step S (0-based):
                                  exit 1 with a traceback
    NANOD_FAULT_HANG_AT_STEP=S    before step S, ignore SIGTERM/SIGINT and sleep forever (only SIGKILL ends it)
    NANOD_FAULT_REPEAT=1          crash and hang fire on every attempt, not only when NANOD_ATTEMPT is unset or 1
    NANOD_FAULT_SLOW_SAVE_MS=N    the checkpoint writer sleeps N ms after each file, so a test can kill mid-save
    NANOD_FAULT_SLOW_STEP_MS=N    sleep N ms before each optimizer step (a slow card: time-limit tests)
    NANOD_FAULT_VRAM_GB=G         on CUDA, cap this process's memory at G GiB (a real small card simulated on a
                                  large one: allocations past it raise a real CUDA OOM), every attempt
    NANOD_FAULT_RANK=R            under torchrun, the OOM, crash and hang faults fire on rank R only
                                  (default: on every rank)

A run that SLURM requeued (SLURM_RESTART_COUNT > 0) is not a first attempt either.

"At step S" means after S optimizer steps completed, before step S runs: the
last step line printed is S-1. This module only reads the environment and
raises; it has no other effect on training.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    oom_above: int | None = None
    crash_at: int | None = None
    hang_at: int | None = None
    slow_save_ms: int = 0
    slow_step_ms: int = 0
    vram_gb: float | None = None

    @classmethod
    def from_env(cls, env=os.environ) -> "Faults":
        def num(name: str) -> int | None:
            value = env.get(name, "").strip()
            if not value:
                return None
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None

        first = (env.get("NANOD_ATTEMPT", "").strip() in ("", "1")
                 and env.get("SLURM_RESTART_COUNT", "").strip() in ("", "0")) or env.get("NANOD_FAULT_REPEAT", "") == "1"
        only = num("NANOD_FAULT_RANK")
        here = only is None or only == (num("RANK") or 0)
        return cls(oom_above=num("NANOD_FAULT_OOM_ABOVE") if here else None,
                   crash_at=num("NANOD_FAULT_CRASH_AT_STEP") if first and here else None,
                   hang_at=num("NANOD_FAULT_HANG_AT_STEP") if first and here else None,
                   slow_save_ms=num("NANOD_FAULT_SLOW_SAVE_MS") or 0,
                   slow_step_ms=num("NANOD_FAULT_SLOW_STEP_MS") or 0,
                   vram_gb=_gib(env.get("NANOD_FAULT_VRAM_GB", "")))

    def limit_vram(self, device) -> None:
        """Cap the caching allocator at vram_gb on a CUDA device (no effect elsewhere)."""
        if self.vram_gb is None or device.type != "cuda":
            return
        import torch
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.vram_gb * 2**30 / total), device)

    def before_step(self, step: int, device_batch_size: int) -> None:
        """Called before each optimizer step; raises or hangs when a fault is due."""
        if self.slow_step_ms:
            time.sleep(self.slow_step_ms / 1000)
        if self.crash_at is not None and step == self.crash_at:
            raise RuntimeError(f"NANOD_FAULT_CRASH_AT_STEP={step}: injected crash")
        if self.hang_at is not None and step == self.hang_at:
            hang_forever()

    def before_forward(self, device_batch_size: int) -> None:
        if self.oom_above is not None and device_batch_size > self.oom_above:
            import torch
            raise torch.OutOfMemoryError(
                f"NANOD_FAULT_OOM_ABOVE={self.oom_above}: simulated out of memory at device_batch_size={device_batch_size}")


def _gib(value: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        raise ValueError(f"NANOD_FAULT_VRAM_GB={value!r} is not a number of GiB") from None
    if not gib > 0:
        raise ValueError(f"NANOD_FAULT_VRAM_GB={value!r} must be positive")
    return gib


def hang_forever() -> None:
    # a hung CUDA call does not answer signals either: the daemon has to SIGKILL
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        time.sleep(3600)
