"""Trainer `nanochat`: run the phase scripts of a user's own nanochat checkout.

What it does: builds the command line of one attempt (`python -m scripts.base_train`
etc. from the checkout; a job on several GPUs gets torchrun around it from the
launcher, daemon/launchers/torchrun.py) in the flag style the checkout understands,
with each flag's value translated where the script gives it another meaning than
the user's (the configurator era's `eval_every: -1` means *every step*); chooses the
environment defaults that are safe for this checkout; reads nanochat's step lines,
classifies how an attempt ended, and says which checkpoints are complete
(trainer/layout.is_complete, with the optimizer files each phase script really writes).

What it does not do: start or watch processes (daemon/launchers/), decide what
happens next (daemon/supervisor.py), read the scripts (nanochat_script.py) or decide
what to refuse (nanochat_check.py), or trust nanochat's own find_last_step, which
looks at model files only and so happily resumes from a save cut off mid-write.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from daemon.attempt_log import OOM_TEXTS, strip_ansi
from daemon.trainers import GUIDE_ALLOC_ENV, Launch, Outcome, Progress
from daemon.trainers.nanochat_check import check_job, fullgraph_culprit
from daemon.trainers.nanochat_script import (EVERY, NEEDS_POSITIVE, SCRIPTS, NanochatRefused, Script,
                                             phase_script, read_script, resolve_python, resolve_repo)
from trainer import layout

__all__ = ["NanochatTrainer", "NanochatRefused", "check_job", "read_script", "format_flags", "parse_step_line",
           "classify_exit", "translate_value", "NEVER"]

DIR_PHASES = {v: k for k, v in layout.PHASE_DIRS.items()}
# What nanod passes for an `X <= 0` that the script would not read as "off" (see translate_value).
# `step % NEVER == 0` only at step 0, and every such test nanochat has also fires at the end.
NEVER = 1_000_000_000
GUIDE_COMPILE_ENV = {"TORCH_COMPILE_DISABLE": "1"}   # the guide's advice for mid and sft, where it is safe

# argparse prints "usage: ..." then "<prog>: error: ..." and exits 2; the configurator raises.
ARGPARSE_ERROR = re.compile(r"^usage: .*?^\S+: error: ", re.M | re.S)
CONFIGURATOR_ERROR = re.compile(r"Unknown config key: |AssertionError: Type mismatch")

# base (both eras) and nanod's trainer: "step 00250/03520 (7.10%) | loss: 3.1 | ..."
# mid/sft (argparse era): "step 00012 (3.00%) | loss: 3.1 | ..."
_STEP = re.compile(r"^\s*step\s+(\d+)(?:/(\d+))?\s+\(\s*[\d.]+%\)\s*\|\s*loss:\s*([-+\w.]+)")
# chat_sft (configurator era): "Step 00000/00010 | Training loss: 1.23| lrm: ... | num_tokens: 1,234"
_SFT_STEP = re.compile(r"^\s*Step\s+(\d+)/(\d+)\s*\|\s*Training loss:\s*([-+\w.]+)")
_DT = re.compile(r"\|\s*dt:\s*([\d.]+)\s*ms")
_TOKS = re.compile(r"\|\s*tok/sec:\s*([\d,.]+)")
_MEM = re.compile(r"\|\s*peak_mem:\s*([\d.]+)\s*GiB")


def translate_value(script: Script, key: str, value):
    """(the value to pass, a one-line note when it differs from the user's) for one flag.

    Read from the script's text (nanochat_script.every): an `X <= 0` stays where every
    `step % X` test is guarded by `X > 0` (it means off); where a test is unguarded,
    -1 means every step (0 divides by zero), so nanod passes NEVER; where the guarded
    block sets something the save needs (guide-era mid_train's val_bpb), "off" crashes
    at the save, so nanod passes NEVER too. An int for a float option becomes a float
    (the configurator refuses 1 where 1.0 is expected).
    """
    sem = script.every.get(key)
    if sem in (EVERY, NEEDS_POSITIVE) and _int(value) and value <= 0:
        where = f"scripts/{script.path.name}"
        if sem == EVERY:
            why = (f"means every step in {where} (it tests step % {key} without a {key} > 0 guard)" if value < 0
                   else f"divides by zero in {where} (step % {key})")
        else:
            why = (f"turns off the evaluation in {where}, but its final save reads "
                   f"{', '.join(script.needs[key])}, which only that evaluation sets (it would crash there)")
        return NEVER, f"{key}: {value} {why}; nanod passes {NEVER}, which runs it at most at step 0 and at the end"
    if script.kinds.get(key) == "float" and _int(value):
        return float(value), None
    return value, None


# ---- the adapter ----------------------------------------------------------------------

@dataclass(frozen=True)
class NanochatLaunch(Launch):
    """A Launch plus one-line warnings the daemon should record as events."""

    notes: tuple[str, ...] = field(default_factory=tuple)


class NanochatTrainer:
    """TrainerAdapter for `runner: nanochat`; one per job (what it says depends on the checkout)."""

    name = "nanochat"

    def __init__(self, settings=None, spec=None):
        self.settings = settings
        self.spec = spec

    def for_job(self, spec) -> "NanochatTrainer":
        """This adapter bound to one job: can_resume, optim_ranks and is_complete depend on its checkout."""
        return NanochatTrainer(self.settings, spec)

    # -- where and when -----------------------------------------------------------------
    def checkpoint_dir(self, root: Path, phase: str, model_tag: str) -> Path:
        return layout.checkpoint_dir(root, phase, model_tag)

    def script(self, phase: str, spec=None) -> Script:
        spec = spec or self.spec
        if spec is None:
            raise NanochatRefused("the nanochat adapter needs the job's spec")
        return phase_script(spec, phase)

    def can_resume(self, phase: str) -> bool:
        """False: the phase restarts from its input checkpoint after a failure."""
        try:
            return self.script(phase).can_resume
        except (NanochatRefused, OSError):
            return False

    def default_env(self, phase: str) -> dict[str, str]:
        """The guide's allocator setting, and TORCH_COMPILE_DISABLE=1 for mid and sft only where it is
        safe: not where the checkout compiles with fullgraph=True (HEAD's optimizer step), which then
        fails on its first step."""
        return {**GUIDE_ALLOC_ENV, **(GUIDE_COMPILE_ENV if self._compile_off_is_safe(phase) else {})}

    def _compile_off_is_safe(self, phase: str) -> bool:
        return phase in ("mid", "sft") and (self.spec is None or fullgraph_culprit(self.spec, phase) is None)

    def optim_ranks(self, phase: str) -> int:
        """How many optim_<step>_rank<r>.pt files a complete checkpoint of this phase has."""
        nproc = self.spec.world_size if self.spec is not None else 1   # one rank per GPU of the job
        try:
            saving = self.script(phase).optim_saving
        except (NanochatRefused, OSError):
            saving = "all"
        return {"none": 0, "rank0": 1}.get(saving, nproc)

    def is_complete(self, ckpt_dir: Path, step: int) -> bool:
        phase = DIR_PHASES.get(Path(ckpt_dir).parent.name, "base")
        return layout.is_complete(ckpt_dir, step, optim_ranks=self.optim_ranks(phase))

    def latest_complete(self, ckpt_dir: Path) -> int | None:
        phase = DIR_PHASES.get(Path(ckpt_dir).parent.name, "base")
        return layout.latest_complete(ckpt_dir, optim_ranks=self.optim_ranks(phase))

    # -- the command line ---------------------------------------------------------------
    def build_launch(self, spec, phase_index: int, *, args: dict, resume_from: int | None,
                     init_from: int | None) -> NanochatLaunch:
        """One attempt's argv, env and cwd. Raises NanochatRefused (one line) instead."""
        spec = spec or self.spec
        self.spec = spec
        settings = self.settings
        if settings is not None:
            check_job(spec, settings)
        repo = resolve_repo(spec)
        python = resolve_python(spec, repo)
        if python is None:
            raise NanochatRefused(f"job {spec.name}: nanochat.python {spec.nanochat.python!r} not found")
        phase = spec.phases[phase_index].phase
        script = self.script(phase, spec)
        style = spec.nanochat.flag_style if spec.nanochat.flag_style != "auto" else script.flag_style
        tag = spec.resolved_model_tag
        root = settings.checkpoint_root if settings is not None else layout.base_dir()
        notes: list[str] = []

        chosen = None
        if args.get("device_batch_size") == "auto":
            chosen, note = auto_batch_size(spec, phase_index)
            args = {**args, "device_batch_size": chosen}
            notes.append(note)
        flags: dict[str, object] = {}
        for key, value in args.items():
            flags[key], note = translate_value(script, key, value)
            if note:
                notes.append(note)
        culprit = fullgraph_culprit(spec, phase) if phase in ("mid", "sft") else None
        if culprit and "TORCH_COMPILE_DISABLE" not in spec.phase_env(phase_index):
            notes.append(f"TORCH_COMPILE_DISABLE not set for {phase} (nanod's default for mid and sft): {culprit} "
                         f"compiles with fullgraph=True, which fails on the first step with compiling disabled")
        flags["model_tag"] = tag
        if phase != "base" and init_from is None:
            # never let nanochat pick "the newest model file" itself: it may be a torn save
            init_from = self._newest_input(spec, phase_index, root, tag)
        if phase != "base" and init_from is not None:
            source = self._source_phase(spec, phase_index, root, tag, init_from)
            if "source" in script.options:
                flags["source"] = source
            step_key = "model_step" if "model_step" in script.options else "step" \
                if "step" in script.options else None
            if step_key:
                flags[step_key] = init_from
            else:
                notes.append(f"scripts/{SCRIPTS[phase]}.py cannot be told which {source} step to start "
                             f"from; it picks the newest model file itself")
        if resume_from is not None:
            if not script.can_resume:
                raise NanochatRefused(f"job {spec.name}: scripts/{SCRIPTS[phase]}.py cannot resume")
            if not _int(args.get("total_batch_size")) or args["total_batch_size"] <= 0:
                total = self._resolved_total_batch(root, phase, tag, resume_from)
                if total is not None:
                    flags["total_batch_size"] = total
                else:
                    notes.append(f"total_batch_size not pinned: the meta of {phase} step {resume_from} "
                                 f"does not record it")
            flags["resume_from_step"] = resume_from

        # one process's command; for several GPUs the launcher runs it through torchrun
        # (`python -m torch.distributed.run`: the checkout's own torch), one rank per GPU
        argv = [str(python), "-m", f"scripts.{SCRIPTS[phase]}"]
        argv += format_flags(flags, style=style, script=script)
        # (attempt_env adds the job's and the phase's env over these)
        env = {"PYTHONUNBUFFERED": "1",  # else stdout into a file is block-buffered: no progress for minutes
               "NANOCHAT_BASE_DIR": str(root)}
        return NanochatLaunch(argv=argv, env=env, cwd=repo, notes=tuple(notes), device_batch_size=chosen)

    def _newest_input(self, spec, phase_index: int, root: Path, tag: str) -> int | None:
        """The newest complete checkpoint a mid/sft phase can start from, when the daemon named none."""
        sources = (spec.phases[phase_index - 1].phase,) if phase_index > 0 else \
            layout.PREVIOUS_PHASES[spec.phases[phase_index].phase]
        for prev in sources:
            step = self.latest_complete(layout.checkpoint_dir(root, prev, tag))
            if step is not None:
                return step
        return None

    def _source_phase(self, spec, phase_index: int, root: Path, tag: str, step: int) -> str:
        """The phase whose checkpoint `step` a mid/sft attempt starts from."""
        if phase_index > 0:
            return spec.phases[phase_index - 1].phase
        candidates = layout.PREVIOUS_PHASES[spec.phases[phase_index].phase]
        for prev in candidates:
            if self.is_complete(layout.checkpoint_dir(root, prev, tag), step):
                return prev
        return candidates[-1]

    def _resolved_total_batch(self, root: Path, phase: str, tag: str, step: int) -> int | None:
        """total_batch_size as the first run resolved it, from the meta of the resume checkpoint."""
        meta = layout.read_meta(layout.checkpoint_dir(root, phase, tag), step) or {}
        user = meta.get("user_config") if isinstance(meta.get("user_config"), dict) else {}
        for value in (meta.get("total_batch_size"), user.get("total_batch_size")):
            if _int(value) and value > 0:
                return value
        return None

    # -- what it says -------------------------------------------------------------------
    def parse_progress(self, line: str) -> Progress | None:
        return parse_step_line(line)

    def classify_exit(self, returncode: int, log_tail: str) -> Outcome:
        return classify_exit(returncode, log_tail)


def auto_batch_size(spec, phase_index: int, gpus=None) -> tuple[int, str]:
    """(device_batch_size, the runner_note saying why) for `auto` on a nanochat phase.

    nanochat cannot probe, so this is nanod's VRAM estimate (preflight.batch_from_estimate) for the
    job's smallest card at NANOD_AUTOFIT_TARGET of it, and the OOM back-off is the backstop; with no
    GPU to read, the phase's default (capped to what divides a step's rows). Raises ValueError
    for a bad NANOD_AUTOFIT_TARGET."""
    import os

    from daemon import preflight
    from trainer.options import autofit_target, default_batch_choice
    phase = spec.phases[phase_index].phase
    target = autofit_target({**os.environ, **spec.phase_env(phase_index)})
    shape = preflight.phase_shape(spec, phase_index)
    candidates = shape["candidates"] or [1]
    if gpus is None:
        from daemon.gpu.vram import read_gpus
        gpus = read_gpus()
    cards = [g for g in gpus.gpus if g.index in spec.gpu_indices and g.total_bytes]
    said = "nanochat has no auto-fit"
    if not cards:
        chosen = default_batch_choice(phase, candidates)
        why = gpus.note or "no NVIDIA GPU found"
        return chosen, (f"device_batch_size auto: {said} and no GPU is visible here ({why}): {phase}'s default, "
                        f"{chosen}; an out-of-memory halves it")
    card = min(cards, key=lambda g: g.total_bytes)
    flags = preflight.phase_flags(spec, phase_index)
    chosen = preflight.batch_from_estimate(flags, phase, card.total_bytes, target, spec.world_size)
    where = f"GPU {card.index} ({card.total_bytes / 2**30:.1f} GiB)"
    if chosen is None:
        return 1, (f"device_batch_size auto: {said}; even batch 1 is estimated over {target:.0%} of {where}: "
                   "trying 1")
    need = preflight.estimate_vram(flags, phase, chosen)
    return chosen, (f"device_batch_size auto: {said}; nanod's VRAM estimate picks {chosen} for {where} "
                    f"(estimated {need / 2**30:.1f} GiB, target {target:.0%}); an out-of-memory halves it")


def format_flags(flags: dict, *, style: str, script: Script) -> list[str]:
    """`--key=value` strings in the checkout's spelling.

    Booleans: a bare `--flag` for argparse store_true options (omitted when false),
    True/False for the configurator (it literal_evals), 1/0 for other argparse options.
    Floats keep their decimal point: the configurator refuses 1 where 1.0 is expected.
    """
    out = []
    for key, value in flags.items():
        name = "--" + (key.replace("_", "-") if style == "dash" else key.replace("-", "_"))
        if isinstance(value, bool):
            if key in script.store_true:
                if value:
                    out.append(name)
                continue
            text = str(value) if script.configurator else str(int(value))
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        if "\x00" in text or "\n" in text:
            raise NanochatRefused(f"argument {key}: value must be one line")
        if script.configurator and "=" in text:  # it splits each argument on '=' exactly once
            raise NanochatRefused(f"argument {key}: a configurator-era nanochat cannot take '=' in a value")
        out.append(f"{name}={text}")
    return out


def parse_step_line(line: str) -> Progress | None:
    """A Progress from one of nanochat's step lines, or None.

    `step` counts optimizer steps done: base_train and the configurator's chat_sft print
    the 0-based index of the step just taken (so +1), mid_train and chat_sft after
    `step += 1`. Tolerates ANSI colours and carriage-return progress redraws.
    """
    for part in reversed(strip_ansi(line).replace("\r", "\n").split("\n")):
        m = _STEP.match(part)
        if m:
            step = int(m.group(1)) + (1 if m.group(2) else 0)
            return Progress(step=step, total=int(m.group(2)) if m.group(2) else None,
                            loss=_float(m.group(3)), dt_ms=_float(_search(_DT, part)),
                            tok_per_sec=_float((_search(_TOKS, part) or "").replace(",", "")),
                            peak_mem_gib=_float(_search(_MEM, part)))
        m = _SFT_STEP.match(part)
        if m:
            return Progress(step=int(m.group(1)) + 1, total=int(m.group(2)), loss=_float(m.group(3)))
    return None


def classify_exit(returncode: int, log_tail: str) -> Outcome:
    """0 completed; an OOM text in the tail is OOM; argument errors are BAD_ARGS; else crashed."""
    if returncode == 0:
        return Outcome.COMPLETED
    text = strip_ansi(log_tail or "")
    if any(t in text for t in OOM_TEXTS):
        return Outcome.OOM
    if (returncode == 2 and ARGPARSE_ERROR.search(text)) or CONFIGURATOR_ERROR.search(text):
        return Outcome.BAD_ARGS
    return Outcome.CRASHED


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _search(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(text)
    return m.group(1) if m else None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None
