"""Trainer `nanochat`: run the phase scripts of a user's own nanochat checkout.

What it does: builds the command line of one attempt (`python -m scripts.base_train`
etc. from the checkout; a job on several GPUs gets torchrun around it from the
launcher, daemon/launchers/torchrun.py) in the flag style the checkout understands, reads nanochat's step lines, classifies how an attempt
ended, and says which checkpoints are complete (trainer/layout.is_complete, with
the optimizer files each phase script really writes).

What it does not do: start or watch processes (daemon/launchers/), decide what
happens next (daemon/supervisor.py), or trust nanochat's own find_last_step, which
looks at model files only and so happily resumes from a save cut off mid-write.

Everything it knows about the checkout it reads from the scripts' text, never by
importing them (the daemon never imports torch): argparse or the old configurator,
dash or underscore option names, whether the script has a resume option, and
whether its save writes optimizer files per rank, on rank 0 only, or not at all.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from daemon.trainers import GUIDE_ALLOC_ENV, Launch, Outcome, Progress
from trainer import layout

SCRIPTS = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft"}
DIR_PHASES = {v: k for k, v in layout.PHASE_DIRS.items()}
# Configurator-era scripts test `step % eval_every == 0`, so -1 there means *every*
# step, not "disabled" (Python's modulo by -1 is always 0). nanod passes this instead;
# it still fires once at step 0, where step % N == 0 for any N.
NEVER = 1_000_000_000
# Variables a job file must not set without allow_job_commands: each one runs code of
# the job file's choosing inside the interpreter (promise 12).
UNSAFE_ENV = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONPLATLIBDIR",
              "BASH_ENV", "ENV"}
PLAIN_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")

OOM_TEXTS = ("torch.OutOfMemoryError", "CUDA out of memory", "CUDA driver error: out of memory",
             "OutOfMemoryError")
# argparse prints "usage: ..." then "<prog>: error: ..." and exits 2; the configurator raises.
ARGPARSE_ERROR = re.compile(r"^usage: .*?^\S+: error: ", re.M | re.S)
CONFIGURATOR_ERROR = re.compile(r"Unknown config key: |AssertionError: Type mismatch")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# base (both eras) and nanod's trainer: "step 00250/03520 (7.10%) | loss: 3.1 | ..."
# mid/sft (argparse era): "step 00012 (3.00%) | loss: 3.1 | ..."
_STEP = re.compile(r"^\s*step\s+(\d+)(?:/(\d+))?\s+\(\s*[\d.]+%\)\s*\|\s*loss:\s*([-+\w.]+)")
# chat_sft (configurator era): "Step 00000/00010 | Training loss: 1.23| lrm: ... | num_tokens: 1,234"
_SFT_STEP = re.compile(r"^\s*Step\s+(\d+)/(\d+)\s*\|\s*Training loss:\s*([-+\w.]+)")
_DT = re.compile(r"\|\s*dt:\s*([\d.]+)\s*ms")
_TOKS = re.compile(r"\|\s*tok/sec:\s*([\d,.]+)")
_MEM = re.compile(r"\|\s*peak_mem:\s*([\d.]+)\s*GiB")

_ARGPARSE_OPT = re.compile(r"""add_argument\(\s*["']--([A-Za-z0-9][A-Za-z0-9_-]*)["']([^\n]*)""")
_CONFIG_GLOBAL = re.compile(r"^([a-z_][a-z0-9_]*)\s*=", re.M)
_CONFIGURATOR = re.compile(r"""exec\(\s*open\([^)]*configurator\.py""")


class NanochatRefused(ValueError):
    """A nanochat job or attempt nanod will not start; str() is the one-line reason."""


# ---- reading the checkout -------------------------------------------------------------

@dataclass(frozen=True)
class Script:
    """What nanod needs to know about one phase script, read from its text."""

    path: Path
    configurator: bool            # pre-2026-01-04: globals overridden by --key=value
    flag_style: str               # "dash" or "underscore"
    options: frozenset[str]       # option names, underscore spelling
    store_true: frozenset[str]    # argparse flags that take no value
    can_resume: bool              # has resume_from_step (only base_train, since 2025-11-13)
    optim_saving: str             # "all" ranks, "rank0" only, or "none"


def read_script(path: Path) -> Script:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    configurator = bool(_CONFIGURATOR.search(text))
    if configurator:
        head = text[:_CONFIGURATOR.search(text).start()]
        options = frozenset(_CONFIG_GLOBAL.findall(head))
        style, store_true = "underscore", frozenset()
    else:
        found = _ARGPARSE_OPT.findall(text)
        names = [n for n, _ in found]
        # argparse with underscores existed for nine days (2026-01-04 .. 2026-01-13)
        style = "dash" if any("-" in n for n in names) or not any("_" in n for n in names) else "underscore"
        options = frozenset(n.replace("-", "_") for n in names)
        store_true = frozenset(n.replace("-", "_") for n, rest in found if "store_true" in rest)
    return Script(path=Path(path), configurator=configurator, flag_style=style, options=options,
                  store_true=store_true, can_resume="resume_from_step" in options,
                  optim_saving=_optim_saving(text))


def _optim_saving(text: str) -> str:
    """Which optimizer files the script's save_checkpoint(...) call writes."""
    start = text.find("save_checkpoint(", text.find("import save_checkpoint") + 1)
    if start < 0:
        return "all"
    args, depth, current, i = [], 0, [], start + len("save_checkpoint(")
    while i < len(text):
        c = text[i]
        if c == "#":  # drop comments: the 4th argument is "None, # we don't bother ..."
            i = text.find("\n", i)
            i = len(text) if i < 0 else i
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                break
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
            i += 1
            continue
        current.append(c)
        i += 1
    args.append("".join(current).strip())
    positional = [a for a in args if a and not re.match(r"^\w+\s*=", a)]
    if len(positional) >= 4 and positional[3] == "None":
        return "none"
    return "all" if any(re.match(r"^rank\s*=", a) for a in args) else "rank0"


def resolve_repo(spec) -> Path:
    return Path(os.path.realpath(os.path.expanduser(spec.nanochat.repo)))


def resolve_python(spec, repo: Path) -> Path | None:
    """The interpreter as an absolute path (relative paths are relative to the checkout)."""
    name = os.path.expanduser(spec.nanochat.python)
    if "/" not in name:
        found = shutil.which(name)
        return Path(found) if found else None
    path = Path(name)
    return Path(os.path.normpath(path if path.is_absolute() else repo / path))


def check_job(spec, settings) -> None:
    """Refuse what nanod will not run for this job (raises NanochatRefused, one line).

    Promise 12: a job file names a checkout and an interpreter, that is, a command.
    That is allowed only when the operator's config (never the job file) allows it:
    the checkout is one of settings.nanochat_repos, or settings.allow_job_commands.
    """
    job = f"job {spec.name}"
    repo = resolve_repo(spec)
    allowed = {Path(os.path.realpath(os.path.expanduser(r))) for r in settings.nanochat_repos}
    trusted = settings.allow_job_commands
    if not trusted and repo not in allowed:
        raise NanochatRefused(f"{job}: nanochat checkout {repo} is not in the operator's nanochat_repos "
                              f"(config.toml), and allow_job_commands is off")
    if not (repo / "scripts").is_dir():
        raise NanochatRefused(f"{job}: {repo} is not a nanochat checkout (no scripts/ folder)")
    python = resolve_python(spec, repo)
    if python is None or not python.is_file() or not os.access(python, os.X_OK):
        raise NanochatRefused(f"{job}: nanochat.python {spec.nanochat.python!r} is not an executable file")
    if not trusted and not (_inside(python, repo) or PLAIN_PYTHON.match(spec.nanochat.python)
                            or (settings.python and python == Path(settings.python))):
        raise NanochatRefused(f"{job}: nanochat.python {spec.nanochat.python!r} is outside the checkout; "
                              f"name it there (e.g. .venv/bin/python) or set allow_job_commands")
    for i, p in enumerate(spec.phases):
        env = spec.phase_env(i)
        if "NANOCHAT_BASE_DIR" in env:
            raise NanochatRefused(f"{job}: env NANOCHAT_BASE_DIR: set nanochat_base_dir in nanod's config instead, "
                                  f"so nanod watches the checkpoints where nanochat writes them")
        bad = sorted(k for k in env if k.startswith("LD_") or k in UNSAFE_ENV)
        if bad and not trusted:
            raise NanochatRefused(f"{job}: env {bad[0]} would run code the operator has not allowed "
                                  f"(set allow_job_commands to permit it)")
        script_path = repo / "scripts" / f"{SCRIPTS[p.phase]}.py"
        if not script_path.is_file():
            if p.phase == "mid":
                raise NanochatRefused(f"{job}: this nanochat checkout has no mid phase "
                                      f"(removed 2026-01-31); drop the mid phase")
            raise NanochatRefused(f"{job}: {script_path} does not exist")
        for key in ("model_tag", "model_step", "step", "source"):
            if key in p.args:
                raise NanochatRefused(f"{job}: phases.{p.phase}.args.{key} is nanod's to set "
                                      f"(model_tag at the top of the job file)")
        script = read_script(script_path)
        if script.can_resume and not _positive(p.args.get("num_iterations")):
            raise NanochatRefused(
                f"{job}: phases.{p.phase}.args.num_iterations is required with runner nanochat: a relaunch "
                f"must keep the schedule of the first run, and nanochat's meta does not record the count it "
                f"computed (copy it from its 'number of iterations' line)")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
        path = resolve_repo(spec) / "scripts" / f"{SCRIPTS[phase]}.py"
        if not path.is_file():
            if phase == "mid":
                raise NanochatRefused(f"job {spec.name}: this nanochat checkout has no mid phase "
                                      f"(removed 2026-01-31); drop the mid phase")
            raise NanochatRefused(f"job {spec.name}: {path} does not exist")
        return read_script(path)

    def can_resume(self, phase: str) -> bool:
        """False: the phase restarts from its input checkpoint after a failure."""
        try:
            return self.script(phase).can_resume
        except (NanochatRefused, OSError):
            return False

    def default_env(self, phase: str) -> dict[str, str]:
        return {**GUIDE_ALLOC_ENV, **({"TORCH_COMPILE_DISABLE": "1"} if phase in ("mid", "sft") else {})}

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

        flags: dict[str, object] = {}
        for key, value in args.items():
            if script.configurator and key.endswith("_every") and key != "save_every" \
                    and isinstance(value, int) and not isinstance(value, bool) and value < 0:
                notes.append(f"{key}: {value} means every step in this configurator-era nanochat "
                             f"checkout; nanod passes {NEVER} to turn it off")
                value = NEVER
            flags[key] = value
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
            if not _positive(args.get("total_batch_size")):
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
        return NanochatLaunch(argv=argv, env=env, cwd=repo, notes=tuple(notes))

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
            if _positive(value):
                return value
        return None

    # -- what it says -------------------------------------------------------------------
    def parse_progress(self, line: str) -> Progress | None:
        return parse_step_line(line)

    def classify_exit(self, returncode: int, log_tail: str) -> Outcome:
        return classify_exit(returncode, log_tail)


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
    for part in reversed(_ANSI.sub("", line).replace("\r", "\n").split("\n")):
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
    text = _ANSI.sub("", log_tail or "")
    if any(t in text for t in OOM_TEXTS):
        return Outcome.OOM
    if (returncode == 2 and ARGPARSE_ERROR.search(text)) or CONFIGURATOR_ERROR.search(text):
        return Outcome.BAD_ARGS
    return Outcome.CRASHED


def _search(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(text)
    return m.group(1) if m else None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None
