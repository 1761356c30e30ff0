"""Trainer `builtin`: nanod's own trainer, `python -m trainer {base,mid,sft}`.

Knows the trainer's command line, its step lines, its exit codes
(trainer/exitcodes.py) and its checkpoint layout (trainer/layout.py); nothing
else. The interpreter is the operator's `python` setting, else this one.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from daemon.attempt_log import OOM_TEXTS  # what an out-of-memory looks like when the exit code does not say it
from daemon.trainers import GUIDE_ALLOC_ENV, Launch, Outcome, Progress
from trainer import exitcodes, layout

REPO_ROOT = Path(layout.__file__).resolve().parents[1]  # where the trainer package is

_STEP = re.compile(r"^step\s+(\d+)(?:/(\d+))?")
_FIELDS = {
    "loss": re.compile(r"\|\s*loss:\s*([-+0-9.eE]+|nan|inf)"),
    "dt_ms": re.compile(r"\|\s*dt:\s*([0-9.]+)\s*ms"),
    "tok_per_sec": re.compile(r"\|\s*tok/sec:\s*([0-9,.]+)"),
    "peak_mem_gib": re.compile(r"\|\s*peak_mem:\s*([0-9.]+)\s*GiB"),
}


def parse_step_line(line: str) -> Progress | None:
    """A nanochat-style step line: `step 00012/00040 (30.00%) | loss: 4.12 | dt: 81.00ms | tok/sec: 2,521`."""
    m = _STEP.match(line)
    if not m:
        return None
    values: dict[str, float | None] = {}
    for key, rx in _FIELDS.items():
        f = rx.search(line)
        try:
            values[key] = float(f.group(1).replace(",", "")) if f else None
        except ValueError:
            values[key] = None
    # the line for step k is printed after optimizer step k (0-based): k+1 steps are done,
    # the same count a checkpoint of that moment carries (and the nanochat adapter reports)
    return Progress(step=int(m.group(1)) + 1, total=int(m.group(2)) if m.group(2) else None, **values)


_AUTOFIT = re.compile(r"^auto-fit: (?:device_batch_size (\d+)|(no device_batch_size fits))")


def parse_batch_choice(line: str) -> int | None:
    """The device_batch_size the trainer's auto-fit chose (`auto-fit: device_batch_size 8 (...)`);
    1 for `auto-fit: no device_batch_size fits` (even the smallest ran out of memory); else None."""
    m = _AUTOFIT.match(line)
    if not m:
        return None
    return int(m.group(1)) if m.group(1) else 1


def classify_by_code(returncode: int, log_tail: str) -> Outcome:
    if returncode == exitcodes.OK:
        return Outcome.COMPLETED
    if returncode == exitcodes.BAD_ARGS:
        return Outcome.BAD_ARGS
    if returncode == exitcodes.OOM or any(t in log_tail for t in OOM_TEXTS):
        return Outcome.OOM
    if returncode == exitcodes.INTERRUPTED:
        return Outcome.INTERRUPTED
    return Outcome.CRASHED


def format_arg(key: str, value) -> str:
    return f"--{key}={value}"


class BuiltinTrainer:
    """TrainerAdapter for `python -m trainer`."""

    name = "builtin"

    def __init__(self, settings):
        self.python = settings.python or sys.executable

    def checkpoint_dir(self, root: Path, phase: str, model_tag: str) -> Path:
        return layout.checkpoint_dir(root, phase, model_tag)

    def build_launch(self, spec, phase_index: int, *, args: dict, resume_from: int | None,
                     init_from: int | None) -> Launch:
        phase = spec.phases[phase_index].phase
        args = dict(args)
        args.setdefault("model_tag", spec.resolved_model_tag)
        argv = [self.python, "-m", "trainer", phase]
        argv += [format_arg(k, v) for k, v in args.items()]
        if resume_from is not None:
            argv.append(format_arg("resume_from_step", resume_from))
        if init_from is not None and phase != "base":
            argv.append(format_arg("init_step", init_from))
            if phase == "sft" and "source" not in args and phase_index > 0:
                # the step is the plan's previous phase's: a stale mid directory must not be picked instead
                argv.append(format_arg("source", spec.phases[phase_index - 1].phase))
        # the package may not be installed into an operator-chosen interpreter: make it importable
        return Launch(argv=argv, env={"PYTHONPATH": _pythonpath()}, cwd=None)

    def parse_progress(self, line: str) -> Progress | None:
        return parse_step_line(line)

    def classify_exit(self, returncode: int, log_tail: str) -> Outcome:
        return classify_by_code(returncode, log_tail)

    def parse_batch_choice(self, line: str) -> int | None:
        return parse_batch_choice(line)

    def is_complete(self, ckpt_dir: Path, step: int) -> bool:
        return layout.is_complete(ckpt_dir, step)

    def can_resume(self, phase: str) -> bool:
        return True

    def default_env(self, phase: str) -> dict[str, str]:
        """The guide's allocator setting, and no torch.compile for mid and sft (the guide's memory
        advice; nanod's trainer trains the same without it)."""
        return {**GUIDE_ALLOC_ENV, **({"TORCH_COMPILE_DISABLE": "1"} if phase in ("mid", "sft") else {})}


def _pythonpath() -> str:
    import os
    existing = os.environ.get("PYTHONPATH")
    return f"{REPO_ROOT}{os.pathsep}{existing}" if existing else str(REPO_ROOT)
