"""Where an attempt runs: one launcher per place, behind one small interface.

Two axes meet in an attempt. *What* runs is a trainer adapter
(daemon/trainers/: builtin, nanochat): it knows the command line, the step
lines, the exit codes and which checkpoints are complete. *Where* it runs is a
launcher (this room): `local` runs it as a process group on this machine,
holding the job's GPU lock for as long as the attempt lives; `slurm` runs it
as a batch job on a SLURM cluster (a job with a `slurm:` block). A launcher:

- reserve(rec): take what the attempt needs before it starts (the GPU lock),
  or say in one line why the job must wait;
- start(...): run a trainer's Launch, its output appended to the attempt's log;
- adopt(rec, attempt): the attempt a previous daemon left running, if it lives;
- and returns a handle that is polled, terminated (gracefully: the trainer
  saves an emergency checkpoint) and killed as one unit.

What to do when an attempt ends is the supervisor's business, not a launcher's.
"""
from __future__ import annotations

import os
from typing import Protocol

# dropped from the daemon's environment: they are systemd's messages to the daemon, not to the trainer
_DROP_PREFIXES = ("WATCHDOG_", "LISTEN_")
_DROP = {"NOTIFY_SOCKET"}


class AttemptHandle(Protocol):
    """A running attempt, as the loop sees it."""

    pid: int                  # what the record keeps to adopt it later
    pgid: int
    proc_start: int | None
    returncode: int | None    # None while alive, and when it cannot be known (an adopted survivor)
    exited: bool

    def poll(self) -> bool: ...          # True once it has ended (and is cleaned up)

    def terminate(self) -> None: ...     # graceful: SIGTERM, the trainer saves and exits

    def kill(self) -> None: ...          # now

    def describe(self) -> str: ...       # "process group 1234", for events


class Launcher(Protocol):
    name: str

    def reserve(self, rec) -> object | str: ...

    def release(self, reservation) -> None: ...

    def start(self, rec, launch, env: dict[str, str], log, reservation, *, header: str = "") -> AttemptHandle: ...

    def adopt(self, rec, attempt) -> AttemptHandle | None: ...


def attempt_env(settings, spec, phase_index: int, attempt_n: int, *, trainer_env: dict[str, str],
                defaults: dict[str, str], place_env: dict[str, str]) -> dict[str, str]:
    """The attempt's environment, each layer over the one before:

    the daemon's own (less systemd's variables), the trainer's safe defaults,
    nanod's variables, what the trainer's launch needs, where it runs
    (CUDA_VISIBLE_DEVICES), and last the job's and the phase's env.
    """
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(_DROP_PREFIXES)}
    env.update(defaults)
    env.update({"PYTHONUNBUFFERED": "1", "NANOCHAT_BASE_DIR": str(settings.checkpoint_root),
                "NANOD_ATTEMPT": str(attempt_n)})
    env.update(trainer_env)
    env.update(place_env)
    env.update(spec.phase_env(phase_index))
    return env


def launcher_for(settings, spec) -> Launcher:
    """The launcher of a job: where its attempts run (a `slurm:` block: that cluster; else this machine)."""
    if spec.slurm is not None:
        from daemon.launchers.slurm import SlurmLauncher
        return SlurmLauncher(settings)
    from daemon.launchers.local import LocalLauncher
    return LocalLauncher(settings)
