"""`nanod sample NAME [--prompt TEXT] [--max-tokens N] [--temperature T] [--seed S]`: a completion.

From the newest final checkpoint of the job's last phase that has one (the
record's phase_final_steps), made by the built-in trainer. This process never
imports torch: it finds the checkpoint, then replaces itself (os.execve) with
`python -m trainer sample ...` (trainer/generate.py) under the job's
interpreter, so the terminal, signals and exit code are the trainer's own.
`nanod chat` (chat.py) shares everything here but the trainer's subcommand.

The GPU: nothing is locked by default. When the job's GPU lock is held (a
training runs there) it generates on the CPU and says so; `--device cuda` uses
the GPU anyway; `--lock` waits for the lock and holds it until it exits (the
descriptor goes through the exec). For `runner: nanochat` jobs it prints the
nanochat command to use instead and exits 1: nanod does not load their models.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

NAME = "sample"
HELP = "print a completion from the job's newest final checkpoint (built-in trainer)"


def add_arguments(parser) -> None:
    parser.add_argument("name", metavar="NAME", help="the job")
    parser.add_argument("--prompt", default="", metavar="TEXT", help="what to continue (base) or answer (mid/sft)")
    add_generation_arguments(parser, max_tokens=128)


def add_generation_arguments(parser, *, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help=f"most tokens to generate (default {max_tokens})")
    parser.add_argument("--temperature", type=float, default=None, metavar="T", help="0 is greedy (default 0.6)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="among the K likeliest tokens (default 50)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="fixes the output (default: a fresh one)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the GPU when there is one and no training holds its lock, else the CPU")
    parser.add_argument("--lock", action="store_true", help="wait for the job's GPU lock and hold it meanwhile")


def run(args, settings) -> int:
    return exec_trainer("sample", args, settings, ["--prompt", args.prompt])


@dataclass(frozen=True)
class Target:
    """The checkpoint to talk to."""
    phase: str
    step: int
    model_tag: str
    phase_index: int


def exec_trainer(command: str, args, settings, extra: list[str]) -> int:
    """Resolve the job and its checkpoint, then exec `python -m trainer COMMAND`; returns only on refusal."""
    from daemon.cli import UserError
    from daemon.queue import load_job
    check_generation_arguments(args)
    from daemon.commands import job_name
    job_name(args.name)
    rec = load_job(settings, args.name)
    if rec is None:
        raise UserError(f"no job named {args.name!r} in {settings.home} (nanod list shows the jobs)")
    spec = rec.job_spec
    if spec.runner == "nanochat":
        print(nanochat_instead(settings, rec, command, getattr(args, "prompt", "")))
        return 1
    target = find_target(settings, rec)
    argv = [*trainer_python(settings), "-m", "trainer", command, f"--phase={target.phase}",
            f"--model_tag={target.model_tag}", f"--step={target.step}", *extra]
    for flag, value in (("--max_tokens", args.max_tokens), ("--temperature", args.temperature),
                        ("--top_k", args.top_k), ("--seed", args.seed)):
        if value is not None:
            argv.append(f"{flag}={value}")
    env = trainer_env(settings, spec, target)
    device = choose_device(args, settings, spec, command, env)
    argv.append(f"--device={device}")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:
        raise UserError(f"cannot run the trainer's interpreter {argv[0]}: {e.strerror or e}") from None
    return 1  # not reached


def check_generation_arguments(args) -> None:
    from daemon.cli import UserError
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    t = args.temperature
    if t is not None and not 0 <= t <= 100:
        raise UserError(f"--temperature must be between 0 and 100 (0 is greedy), got {t:g}")
    if args.top_k is not None and args.top_k < 0:
        raise UserError(f"--top-k must be 0 (all tokens) or more, got {args.top_k}")


def find_target(settings, rec) -> Target:
    """The newest final checkpoint of the job's last phase that has one; UserError saying what there is."""
    from daemon.cli import UserError
    from trainer import layout
    spec = rec.job_spec
    root = settings.checkpoint_root
    for i in reversed(range(len(spec.phases))):
        phase = spec.phases[i].phase
        step = rec.phase_final_steps.get(phase)
        if step is None:
            continue
        tag = phase_tag(spec, i)
        ckpt_dir = layout.checkpoint_dir(root, phase, tag)
        why = layout.why_incomplete(ckpt_dir, step)
        if why is not None:
            raise UserError(f"job {rec.name}: the final {phase} checkpoint, step {step} in {ckpt_dir}, "
                            f"is not usable: {why}")
        return Target(phase=phase, step=step, model_tag=tag, phase_index=i)
    index = min(rec.phase_index, len(spec.phases) - 1)
    now = spec.phases[index].phase
    newest = layout.latest_complete(layout.checkpoint_dir(root, now, phase_tag(spec, index)))
    there = f"; its newest checkpoint is step {newest}" if newest is not None else "; no checkpoint of it yet"
    raise UserError(f"job {rec.name} has no final checkpoint yet: it is {rec.state.value} in phase {now}{there}")


def phase_tag(spec, index: int) -> str:
    """A phase's checkpoint folder name: its own model_tag flag, else the job's (as the launch does)."""
    return str(spec.phases[index].args.get("model_tag") or spec.resolved_model_tag)


def trainer_python(settings) -> list[str]:
    """The built-in trainer's interpreter, as the daemon launches it (the operator's `python` setting)."""
    from daemon.trainers.builtin import BuiltinTrainer
    python = BuiltinTrainer(settings).python
    if "/" not in python:
        import shutil
        python = shutil.which(python) or python
    return [python]


def trainer_env(settings, spec, target: Target) -> dict[str, str]:
    """This environment, the job's env of that phase over it, and where the checkpoints and trainer are."""
    from daemon.trainers.builtin import _pythonpath
    env = dict(os.environ)
    env.update(spec.phase_env(target.phase_index))
    env.update({"NANOCHAT_BASE_DIR": str(settings.checkpoint_root), "PYTHONPATH": _pythonpath(),
                "PYTHONUNBUFFERED": "1"})
    return env


def choose_device(args, settings, spec, command: str, env: dict) -> str:
    """cpu, cuda or auto for the trainer; with --lock, the job's GPU lock is taken here and kept across the exec."""
    from daemon.cli import UserError
    from daemon.gpu import lock as gpulock
    gpus = spec.gpu_indices or [0]
    path = settings.gpu_lock_path(gpus[0])
    if args.device != "cpu" and "CUDA_VISIBLE_DEVICES" not in spec.env:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[0])  # the job's GPU, whose lock was looked at
    try:
        if args.lock:
            fd = gpulock.acquire(path, on_wait=lambda who: print(
                f"nanod {command}: waiting for GPU {gpus[0]}'s lock, held by {who}", file=sys.stderr, flush=True))
            os.set_inheritable(fd, True)  # held by the trainer after the exec, released when it exits
            gpulock.write_holder(path, pid=os.getpid(), command=f"nanod {command} {args.name}", home=str(settings.home),
                                 job=None)
            return args.device
        if args.device == "auto" and gpulock.is_held(path):
            print(f"nanod {command}: GPU {gpus[0]} is in use ({gpulock.describe_holder(path)}): running on the CPU "
                  f"(--device cuda to share it anyway, --lock to wait for it)", file=sys.stderr, flush=True)
            return "cpu"
    except OSError as e:
        raise UserError(f"cannot use the GPU lock {e.filename or path}: {e.strerror or e}") from None
    return args.device


def nanochat_instead(settings, rec, command: str, prompt: str) -> str:
    """What to run instead for a `runner: nanochat` job: the checkout's own chat_cli (and chat_web)."""
    from daemon.trainers.nanochat_script import resolve_python, resolve_repo
    spec = rec.job_spec
    phases = [p.phase for p in spec.phases]
    index = next((i for i in reversed(range(len(phases))) if rec.phase_final_steps.get(phases[i]) is not None),
                 len(phases) - 1)
    source = phases[index]
    step = rec.phase_final_steps.get(source)
    repo = resolve_repo(spec)
    python = resolve_python(spec, repo) or spec.nanochat.python
    flags = ["-i", source, "-g", phase_tag(spec, index)] + (["-s", str(step)] if step is not None else [])
    head = f"cd {shlex.quote(str(repo))} && NANOCHAT_BASE_DIR={shlex.quote(str(settings.checkpoint_root))} " \
           f"{shlex.quote(str(python))} -m scripts."
    lines = [f"nanod {command}: job {rec.name} trains with nanochat (runner: nanochat), whose models nanod does not "
             f"load; use nanochat's own chat script:",
             "  " + head + "chat_cli " + shlex.join(flags + (["-p", prompt] if command == "sample" and prompt else []))]
    if Path(repo, "scripts", "chat_web.py").is_file():
        lines.append("  " + head + "chat_web " + shlex.join(flags) + "    (the web UI)")
    if source == "base":
        lines.append("  (the job has no chat model yet: -i base talks to its base model)")
    return "\n".join(lines)

