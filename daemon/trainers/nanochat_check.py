"""What nanod refuses before a nanochat job is accepted, and what it warns about.

Two kinds of refusal, both one line naming the job, the field and the file:
- the checkout and how it would run (check_checkout): promise 12's allow-list (a job
  file that names a checkout and an interpreter names a command, so only the
  operator's config may allow it), an interpreter inside the checkout, no
  environment that would run other code, the phase scripts present, nanod's own
  arguments left to nanod, num_iterations for a phase that resumes;
- each phase's flags against its script's own options (list_flag_problems): a name
  the script does not have, a value of the wrong type, one outside argparse's
  choices. The guide's plan gives mid `save_every` and sft `max_tokens`, which no
  nanochat script has: refused at submission, not after the hours of base.

`check_job` is both, the one refusal the inbox, `nanod submit` and every launch
use; `nanod check` shows the same facts one line per phase (daemon/preflight.py).
Nothing here runs or imports the checkout: daemon/trainers/nanochat_script.py reads it.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from daemon.trainers.nanochat_script import (SCRIPTS, NanochatRefused, Script, compiles_fullgraph, phase_script,
                                             resolve_python, resolve_repo)

# Variables a job file must not set without allow_job_commands: each one runs code of
# the job file's choosing inside the interpreter (promise 12).
UNSAFE_ENV = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONPLATLIBDIR",
              "BASH_ENV", "ENV"}
PLAIN_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
NANODS_OWN = ("model_tag", "model_step", "step", "source")   # nanod names the checkpoint to start from


def check_job(spec, settings) -> None:
    """Refuse what nanod will not run for this job: NanochatRefused with every reason, one line."""
    check_checkout(spec, settings)
    problems = [msg for i in range(len(spec.phases)) for msg in list_flag_problems(spec, i)]
    if problems:
        raise NanochatRefused(f"job {spec.name}: " + "; ".join(problems))


def check_checkout(spec, settings) -> None:
    """The checkout, the interpreter, the environment and nanod's own arguments (raises NanochatRefused)."""
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
        script = phase_script(spec, p.phase)
        for key in NANODS_OWN:
            if key in p.args:
                raise NanochatRefused(f"{job}: phases.{p.phase}.args.{key} is nanod's to set "
                                      f"(model_tag at the top of the job file)")
        if script.can_resume and not _positive(p.args.get("num_iterations")):
            raise NanochatRefused(
                f"{job}: phases.{p.phase}.args.num_iterations is required with runner nanochat: a relaunch "
                f"must keep the schedule of the first run, and nanochat's meta does not record the count it "
                f"computed (copy it from its 'number of iterations' line)")


def list_flag_problems(spec, phase_index: int) -> list[str]:
    """One message per flag of the phase that its script would refuse (raises NanochatRefused when the
    script cannot be read)."""
    p = spec.phases[phase_index]
    script = phase_script(spec, p.phase)
    where = f"scripts/{script.path.name}"
    out = []
    for key, value in p.args.items():
        field = f"phases.{p.phase}.args.{key}"
        if key not in script.options:
            if key in NANODS_OWN:
                continue  # check_checkout says whose it is
            hint = _hint(script, key)
            out.append(f"{field}: no such option in {where}" + (f" ({hint})" if hint else ""))
        elif key == "device_batch_size" and value == "auto":
            continue  # nanod picks a number before the launch (nanochat.auto_batch_size)
        elif script.kinds.get(key) and not _fits(script.kinds[key], value, script.configurator):
            out.append(f"{field}: {where} wants {'an' if script.kinds[key] == 'int' else 'a'} "
                       f"{script.kinds[key]}, got {value!r}")
        elif key in script.choices and value not in script.choices[key]:
            out.append(f"{field}: {where} accepts only {', '.join(map(str, script.choices[key]))}, got {value!r}")
    return out


def compile_warning(spec, phase_index: int) -> str | None:
    """Why the job's own TORCH_COMPILE_DISABLE=1 will break this phase, when it will."""
    p = spec.phases[phase_index]
    if spec.phase_env(phase_index).get("TORCH_COMPILE_DISABLE", "") in ("", "0"):
        return None
    culprit = fullgraph_culprit(spec, p.phase)
    if culprit is None:
        return None
    return (f"env TORCH_COMPILE_DISABLE=1 for {p.phase}: {culprit} compiles with fullgraph=True, which fails on the "
            f"first step with compiling disabled on current torch (\"found no compiled frames\"); drop it")


def fullgraph_culprit(spec, phase: str) -> str | None:
    """The checkout's file that compiles with fullgraph=True for this phase, or None (also when unreadable)."""
    try:
        return compiles_fullgraph(resolve_repo(spec), phase_script(spec, phase).path)
    except NanochatRefused:
        return None


def _hint(script: Script, key: str) -> str:
    """What the user probably meant, where it is known."""
    stem = script.path.stem
    if key == "save_every" and stem in (SCRIPTS["mid"], SCRIPTS["sft"]):
        return f"{stem} saves only at its end: drop save_every"
    if key == "max_tokens" and stem == SCRIPTS["sft"]:
        return "chat_sft has no max_tokens; HEAD calls it max_seq_len" + \
            ("" if "max_seq_len" in script.options else ", this checkout has neither: drop it")
    close = difflib.get_close_matches(key, sorted(script.options), n=1, cutoff=0.8)
    return f"did you mean {close[0]}?" if close else ""


def _fits(kind: str, value, configurator: bool) -> bool:
    """Would the script take `value` for an option of this kind, as nanod spells it?"""
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))   # an int is passed as 1.0 (the configurator insists)
    # argparse's str takes anything; the configurator literal_evals, so "12" would arrive as an int
    return not configurator or isinstance(value, str)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
