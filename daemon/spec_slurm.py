"""The job file's `slurm:` block: where on a SLURM cluster a job's attempts run (pydantic, strict).

A job with `slurm:` runs each attempt as one batch job (daemon/launchers/slurm.py)
instead of on this machine's GPUs. Every value here ends up on an `#SBATCH`
line of the script nanod writes, so values are single words (no whitespace,
no quotes, no `#`), and the options nanod itself owns cannot be given in
`extra_args`: the script would stop working as nanod follows it. This module
validates; it submits nothing.
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from daemon.units import parse_duration

# a value of an #SBATCH line: one word, nothing a shell or sbatch's own line parser would split or strip
_WORD = re.compile(r"^[^\s'\"\\#\x00-\x1f\x7f]{1,200}$")
# SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_GRES_ITEM = re.compile(r"^([a-z][a-z0-9_]*)(?::([A-Za-z0-9_.-]+?))?(?::(\d+))?$")
MIN_GRACE = 10.0  # s: less is no time for any emergency checkpoint

# sbatch options nanod's script owns, with why a job file cannot set them (long form, and short where there is one)
REFUSED = {
    "--wrap": "nanod writes the batch script itself",
    "--array": "each nanod attempt is one batch job, not an array",
    "--output": "nanod owns the log (the attempt's log, appended across requeues)",
    "--error": "nanod owns the log (the attempt's log, appended across requeues)",
    "--open-mode": "nanod appends to the attempt's log across requeues",
    "--requeue": "nanod always submits with --requeue",
    "--no-requeue": "a requeue is how a pre-empted job resumes; nanod always submits with --requeue",
    "--signal": "nanod sets the pre-emption signal from slurm.checkpoint_grace",
    "--job-name": "the job name tells nanod which job and attempt a SLURM job is",
    "--parsable": "nanod reads sbatch's answer itself",
    "--chdir": "nanod chooses the working directory",
    "--export": "nanod passes the job's environment (use env: in the job file)",
    "--wait": "sbatch must not block the daemon",
    "--test-only": "nothing would run",
    "--nodes": "one node per attempt (several nodes are not supported yet)",
    "--gpus": "use slurm.gres or slurm.gpus_per_node: nanod runs one rank per GPU of the node",
    "--gpus-per-task": "use slurm.gres or slurm.gpus_per_node: nanod runs one rank per GPU of the node",
    "--ntasks": "one task per attempt: the trainer (and torchrun for several GPUs) runs inside it",
    "--ntasks-per-node": "one task per attempt: the trainer (and torchrun for several GPUs) runs inside it",
    "--time": "use slurm.time",
    "--partition": "use slurm.partition",
    "--account": "use slurm.account",
    "--qos": "use slurm.qos",
    "--gres": "use slurm.gres",
    "--gpus-per-node": "use slurm.gpus_per_node",
    "--cpus-per-task": "use slurm.cpus_per_task",
    "--mem": "use slurm.mem",
    "--constraint": "use slurm.constraint",
}
SHORT = {"-a": "--array", "-o": "--output", "-e": "--error", "-J": "--job-name", "-D": "--chdir", "-W": "--wait",
         "-N": "--nodes", "-G": "--gpus", "-n": "--ntasks", "-t": "--time", "-p": "--partition", "-A": "--account",
         "-q": "--qos", "-c": "--cpus-per-task", "-C": "--constraint"}


def parse_time(value: str) -> int:
    """Seconds of a SLURM time limit ("30" minutes, "1:30:00", "2-00:00:00"); ValueError otherwise."""
    m = _TIME.fullmatch(value)
    if not m:
        raise ValueError(f"{value!r} is not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif b is None:       # M
        seconds = a * 60
    elif c is None:       # M:S
        seconds = a * 60 + b
    else:                 # H:M:S
        seconds = a * 3600 + b * 60 + c
    if seconds <= 0:
        raise ValueError(f"{value!r}: a time limit must be positive")
    return seconds


def gres_gpus(gres: str) -> int:
    """GPUs a gres string asks for ("gpu:4", "gpu:a100:2", "gpu", "gpu:2,nvme:1"); ValueError when malformed."""
    total = 0
    for item in gres.split(","):
        m = _GRES_ITEM.fullmatch(item)
        if not m:
            raise ValueError(f"{item!r} is not a gres (e.g. gpu:1, gpu:a100:4)")
        name, kind, count = m.groups()
        if kind is not None and count is None and kind.isdigit():
            kind, count = None, kind   # "gpu:4": the count, not a type
        if name == "gpu":
            total += int(count) if count is not None else 1
    return total


def check_extra_args(args: list[str]) -> list[str]:
    """Each item one sbatch option (`--name=value` or `--flag`), none that nanod owns."""
    for i, item in enumerate(args):
        if not item.startswith("-") or item in ("-", "--"):
            raise ValueError(f"extra_args[{i}] {item!r} is not an option: give each as one item, --name=value")
        if not _WORD.fullmatch(item):
            raise ValueError(f"extra_args[{i}] {item!r}: one word, without spaces, quotes or '#'")
        name = item.split("=", 1)[0] if item.startswith("--") else SHORT.get(item[:2], item[:2])
        if name in REFUSED:
            raise ValueError(f"extra_args[{i}] {item!r} is refused: {REFUSED[name]}")
    return args


def _word(value: str | None) -> str | None:
    if value is not None and not _WORD.fullmatch(value):
        raise ValueError(f"{value!r} must be one word, without spaces, quotes or '#'")
    return value


Word = Annotated[str, BeforeValidator(_word)]
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema({
    "anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string"}],
    "description": "seconds, or a duration like 90s, 10m"})]


class Slurm(BaseModel):
    """Run this job's attempts on a SLURM cluster: each attempt one batch job on one node."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    partition: Word | None = None          # --partition (default: the cluster's default partition)
    time: Word | None = None               # --time, SLURM's format, quoted: "24:00:00", "2-00:00:00", "30"
    account: Word | None = None            # --account
    qos: Word | None = None                # --qos
    gres: Word | None = None               # --gres, e.g. "gpu:4" or "gpu:a100:2": one rank per GPU
    gpus_per_node: int | None = Field(None, ge=1, le=64)  # --gpus-per-node (instead of gres): one rank per GPU
    cpus_per_task: int | None = Field(None, ge=1, le=4096)  # --cpus-per-task
    mem: Word | None = None                # --mem, e.g. "64G"
    constraint: Word | None = None         # --constraint, e.g. "a100|h100"
    # the trainer is told (SIGTERM, through the script) this long before the time limit to save and stop;
    # SLURM may signal up to a minute earlier than asked
    checkpoint_grace: Duration = 120.0
    extra_args: list[str] = Field(default_factory=list, max_length=64)  # more sbatch options, --name=value each

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: object) -> object:
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError(f"must be a quoted string such as \"24:00:00\" (unquoted, YAML reads 24:00:00 as "
                             f"the number {v} and 30 could be minutes or seconds)")
        if isinstance(v, str):
            parse_time(v)
        return v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not _MEM.fullmatch(v):
            raise ValueError(f"{v!r} is not a SLURM memory size (e.g. 64G, 500M)")
        return v

    @field_validator("gres")
    @classmethod
    def _gres(cls, v: str | None) -> str | None:
        if v is not None:
            gres_gpus(v)
        return v

    _extra = field_validator("extra_args")(classmethod(lambda cls, v: check_extra_args(v)))

    @model_validator(mode="after")
    def _together(self) -> "Slurm":
        if self.gres is not None and self.gpus_per_node is not None:
            raise ValueError("give either gres or gpus_per_node, not both")
        if self.checkpoint_grace < MIN_GRACE:
            raise ValueError(f"checkpoint_grace must be at least {MIN_GRACE:.0f}s")
        if self.time is not None and self.checkpoint_grace >= parse_time(self.time):
            raise ValueError(f"checkpoint_grace ({self.checkpoint_grace:g}s) must be shorter than time ({self.time})")
        return self

    @property
    def ranks(self) -> int:
        """One rank per GPU of the allocation (one process when it asks for none)."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return max(1, gres_gpus(self.gres)) if self.gres else 1

    @property
    def resources(self) -> str:
        """A few words for the allocation, for checks and status: "partition gpu, gpu:4, 24:00:00"."""
        bits = [f"partition {self.partition}" if self.partition else "the default partition"]
        bits += [x for x in (self.gres, f"{self.gpus_per_node} GPUs" if self.gpus_per_node else None, self.time) if x]
        return ", ".join(bits)
