"""What runs in an attempt: one adapter per trainer, named by the job's `runner:` key.

`builtin` runs nanod's own trainer (`python -m trainer`); `nanochat` runs the
scripts of a user's nanochat checkout. An adapter only knows its trainer: the
command line, the environment defaults that are safe for it, its step lines,
its exit codes and which of its checkpoints are complete. Where the attempt
runs and how it is stopped is a launcher's (daemon/launchers/); what happens
after it ends is the supervisor's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol


class Outcome(str, Enum):
    """How an attempt ended (separate from the job's state)."""

    COMPLETED = "completed"
    OOM = "oom"
    CRASHED = "crashed"
    STALLED = "stalled"
    INTERRUPTED = "interrupted"      # graceful stop; emergency checkpoint saved
    CANCELLED = "cancelled"
    BAD_ARGS = "bad_args"            # the trainer refused its arguments or data: retrying cannot help
    FAILED_TO_START = "failed_to_start"


@dataclass(frozen=True)
class Progress:
    """One parsed step line."""

    step: int                     # optimizer steps done (a checkpoint now would carry this number)
    total: int | None = None
    loss: float | None = None
    dt_ms: float | None = None
    tok_per_sec: float | None = None
    peak_mem_gib: float | None = None


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one attempt."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added over the daemon's cleaned environment
    cwd: Path | None = None
    device_batch_size: int | None = None   # the value the adapter chose for `auto` (a trainer without auto-fit)


class TrainerAdapter(Protocol):
    name: str

    def checkpoint_dir(self, root: Path, phase: str, model_tag: str) -> Path: ...

    def build_launch(self, spec, phase_index: int, *, args: dict, resume_from: int | None,
                     init_from: int | None) -> Launch: ...

    def parse_progress(self, line: str) -> Progress | None: ...

    def classify_exit(self, returncode: int, log_tail: str) -> Outcome: ...

    def is_complete(self, ckpt_dir: Path, step: int) -> bool: ...

    def can_resume(self, phase: str) -> bool: ...

    def default_env(self, phase: str) -> dict[str, str]: ...


# the training safety guide's allocator setting: safe for every trainer (it only changes how
# PyTorch's caching allocator grows, never what is computed)
GUIDE_ALLOC_ENV = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}


def adapter_for(settings, spec) -> TrainerAdapter:
    """The adapter of a job's trainer (its `runner:`)."""
    if spec.runner == "builtin":
        from daemon.trainers.builtin import BuiltinTrainer
        return BuiltinTrainer(settings)
    from daemon.trainers.nanochat import NanochatTrainer
    return NanochatTrainer(settings, spec)


def check_job(spec, settings) -> None:
    """Refuse a job its trainer would refuse: ValueError, str() the one-line reason.

    The one check before a job is accepted, in the inbox and by `nanod submit` (`nanod
    check` shows the same facts, one line per phase): for nanochat the checkout, its
    interpreter and every phase's flags against its script's own options
    (daemon/trainers/nanochat_check.py). The builtin trainer's flags are checked by
    the preflight before each phase (and by the trainer itself).
    """
    if spec.runner == "nanochat":
        from daemon.trainers.nanochat_check import check_job as check_nanochat_job
        check_nanochat_job(spec, settings)
