"""The YAML job contract: pydantic models and `load_job_file`.

A job file is either a plan (`phases:` list) or a one-phase job (a top-level
`phase:` with its `args`/`env`). Validation is strict: unknown keys, wrong types
(no "8" for 8) and impossible values are errors that name the file and the field,
because a typo must never start a three-day run on defaults. This module reads
files and builds models; it does not decide what happens to a rejected file (the
inbox does) nor start anything.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator,
                      model_validator)

from daemon.notify.events import EVENTS, MAX_URLS, check_events, check_url_syntax
from daemon.spec_slurm import Slurm
from daemon.units import parse_duration

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ARG_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
PHASE_ORDER = ("base", "mid", "sft")
SCHEMA_VERSION = 1

# seconds; "10m", "1h30m", 90. The schema says so, or editors would flag "10m" as an error.
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema({
    "anyOf": [{"type": "number", "exclusiveMinimum": 0},
              {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*)+$"}],
    "description": "seconds, or a duration like 90s, 10m, 1h30m"})]
ArgValue = str | bool | int | float


class JobFileError(ValueError):
    """A job file that cannot become a job; str() is the one-line reason.

    The reason goes into `<file>.rejected` and `nanod status`, and it can quote
    the file (a key name, a value), so it is forced onto one short line here.
    """

    def __init__(self, reason: str):
        super().__init__(one_line(reason))


def one_line(text: str, limit: int = 400) -> str:
    """`text` with control characters escaped (a quoted key may hold a newline) and cut to `limit`."""
    text = re.sub(r"[\x00-\x1f\x7f\u2028\u2029]", lambda m: repr(m.group())[1:-1], str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(name: str, what: str = "name") -> str:
    """Refuse anything that is not [a-z0-9][a-z0-9._-]{0,63}: names become paths."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r} must match [a-z0-9][a-z0-9._-]{{0,63}}")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for key in env:
        if not ENV_NAME_RE.fullmatch(key):
            raise ValueError(f"environment variable name {key!r} is not valid")
    return env


def _normalise_args(args: dict[str, ArgValue]) -> dict[str, ArgValue]:
    """Accept nanochat's dash and underscore spellings; store underscores."""
    out: dict[str, ArgValue] = {}
    for key, value in args.items():
        if not ARG_NAME_RE.fullmatch(key):
            raise ValueError(f"argument name {key!r} is not valid (use e.g. device_batch_size)")
        norm = key.replace("-", "_")
        if norm in out:
            raise ValueError(f"argument {norm!r} is given twice")
        if norm == "resume_from_step":
            raise ValueError("resume_from_step is nanod's to set; it resumes from the newest complete checkpoint")
        out[norm] = value
    return out


class Recovery(_Strict):
    """What the supervisor does when an attempt ends badly."""

    max_restarts_without_progress: int = Field(3, ge=0, le=1000)  # a new checkpoint resets the count
    stall_timeout: Duration = 600.0   # no step line and no checkpoint for this long = stalled
    startup_grace: Duration = 900.0   # the same, before the first step line of an attempt
    kill_grace: Duration = 120.0      # SIGTERM -> SIGKILL: time for an emergency checkpoint
    backoff_max: Duration = 300.0     # crash relaunch delay doubles from 0 up to this
    oom_backoff: bool = True          # halve device_batch_size on OOM, keeping total_batch_size


class Retention(_Strict):
    """Keep-last-N per checkpoint directory (the final checkpoint of a phase is always kept)."""

    keep_last: int | None = Field(3, ge=2)  # None keeps all; 1 is refused (the newest may be mid-write)
    keep_every: int | None = Field(None, ge=1)  # also keep every step that is a multiple of this


class NanochatRunner(_Strict):
    """Where a nanochat checkout is and how to run it (runner: nanochat)."""

    repo: str                                      # path of the checkout
    python: str = "python"                         # its interpreter (e.g. <repo>/.venv/bin/python)
    flag_style: Literal["auto", "dash", "underscore"] = "auto"  # auto: detected from the checkout
    # ranks per attempt; default: one per GPU of the job (gpus:), and if given it must say the same
    nproc_per_node: int | None = Field(None, ge=1, le=64)


class Notify(_Strict):
    """Where this job's events go, beside the operator's notify_urls (daemon/notify/)."""

    urls: list[str] = Field(default_factory=list, max_length=MAX_URLS)  # apprise URLs, e.g. ntfy://my-topic
    on: Annotated[list[str] | None, WithJsonSchema({"type": "array", "items": {"enum": list(EVENTS)},
                                                    "uniqueItems": True})] = None  # default: the operator's notify_on

    @model_validator(mode="before")
    @classmethod
    def _no_command(cls, data: object) -> object:
        if isinstance(data, dict):
            if True in data and "on" not in data:
                # YAML 1.1 reads a bare `on:` key as the boolean true (as GitHub Actions users know)
                data = {("on" if k is True else k): v for k, v in data.items()}
            for key in ("command", "notify_command", "cmd", "exec"):
                if key in data:
                    raise ValueError(f"{key}: a command to run on an event comes from the operator's config "
                                     "(notify_command in config.toml), never from a job file")
        return data

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for i, url in enumerate(v):
            check_url_syntax(url, f"URL {i + 1}")
        if len(set(v)) != len(v):
            raise ValueError("a URL is listed twice")
        return v

    @field_validator("on")
    @classmethod
    def _on(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else check_events(v)


class Phase(_Strict):
    phase: Literal["base", "mid", "sft"]
    args: dict[str, ArgValue] = Field(default_factory=dict)  # the trainer's flags, nanochat's names
    env: dict[str, str] = Field(default_factory=dict)        # over the job's env

    _args = field_validator("args")(classmethod(lambda cls, v: _normalise_args(v)))
    _env = field_validator("env")(classmethod(lambda cls, v: _check_env(v)))


class JobSpec(_Strict):
    """One job: a plan of phases run one after another, each from the previous one's final checkpoint."""

    name: str                                           # defaults to the file stem
    model_tag: str | None = None                        # defaults to d<depth> of the base phase
    runner: Literal["builtin", "nanochat"] = "builtin"
    nanochat: NanochatRunner | None = None              # required with runner: nanochat
    priority: int = Field(0, ge=-100, le=100)           # higher runs first; FIFO within a priority
    gpu: int | None = Field(None, ge=0, le=63)          # one GPU (default 0): the lock taken and CUDA_VISIBLE_DEVICES
    # several GPUs: one rank each through torchrun, every GPU's lock taken (rank r on gpus[r])
    gpus: list[Annotated[int, Field(ge=0, le=63)]] | None = Field(None, min_length=1, max_length=64)
    env: dict[str, str] = Field(default_factory=dict)
    slurm: Slurm | None = None                          # present: attempts run as SLURM batch jobs, not on this machine
    recovery: Recovery = Field(default_factory=Recovery)
    retention: Retention = Field(default_factory=Retention)
    notify: Notify = Field(default_factory=Notify)
    phases: list[Phase] = Field(min_length=1, max_length=len(PHASE_ORDER))

    _name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))
    _env = field_validator("env")(classmethod(lambda cls, v: _check_env(v)))

    @field_validator("model_tag")
    @classmethod
    def _model_tag(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "model_tag")

    @model_validator(mode="after")
    def _plan(self) -> "JobSpec":
        kinds = [p.phase for p in self.phases]
        if len(set(kinds)) != len(kinds) or kinds != sorted(kinds, key=PHASE_ORDER.index):
            raise ValueError(f"phases must be in the order base, mid, sft, each at most once (got {', '.join(kinds)})")
        if self.runner == "nanochat" and self.nanochat is None:
            raise ValueError("runner: nanochat needs a nanochat: {repo: PATH} block")
        if self.runner == "builtin" and self.nanochat is not None:
            raise ValueError("a nanochat: block needs runner: nanochat")
        if self.gpus is not None:
            if self.gpu is not None:
                raise ValueError("give either gpu: N (one GPU) or gpus: [..] (several), not both")
            twice = sorted({g for g in self.gpus if self.gpus.count(g) > 1})
            if twice:
                raise ValueError(f"gpus lists GPU {twice[0]} twice (one rank per GPU)")
        if self.slurm is not None:
            if self.gpu is not None or self.gpus is not None:
                raise ValueError("a job with slurm: runs on the GPUs SLURM allocates: drop gpu:/gpus: "
                                 "(ask for them with slurm.gres or slurm.gpus_per_node)")
            if self.runner == "nanochat":
                raise ValueError("runner: nanochat cannot run on SLURM yet (a requeued batch job must resume "
                                 "by itself, with --resume_from_step=auto, which only the builtin trainer has)")
        nproc = self.nanochat.nproc_per_node if self.nanochat is not None else None
        if nproc is not None and nproc != len(self.gpu_indices):
            have = f"gpus lists {len(self.gpus)}" if self.gpus is not None else "the job has one GPU"
            raise ValueError(f"nanochat.nproc_per_node is {nproc} but {have}: one rank per GPU, so list "
                             f"{nproc} GPUs in gpus: (or drop nproc_per_node)")
        for p in self.phases:
            dbs = p.args.get("device_batch_size")
            if isinstance(dbs, str) and dbs != "auto":
                raise ValueError(f"phases.{p.phase}.args.device_batch_size must be an integer (at least 1) or auto, "
                                 f"got {dbs!r}")
            for key in ("device_batch_size", "num_iterations", "max_seq_len", "max_tokens", "depth"):
                v = p.args.get(key)
                if key == "device_batch_size" and v == "auto":
                    continue   # the trainer finds the largest that fits (trainer/autofit.py)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                    raise ValueError(f"phases.{p.phase}.args.{key} must be an integer, got {v!r}")
                if key in ("device_batch_size", "max_seq_len", "max_tokens", "depth") and v is not None and v < 1:
                    raise ValueError(f"phases.{p.phase}.args.{key} must be at least 1, got {v}")
            if p.phase == "sft":
                from trainer.options import sft_row_length
                sft_row_length(p.args, prefix="phases.sft.args.")   # one setting under two names
        return self

    @property
    def gpu_indices(self) -> list[int]:
        """This machine's GPUs of the job, in rank order: gpus, else [gpu], else [0]; none on SLURM."""
        if self.slurm is not None:
            return []   # SLURM's to allocate: no lock is taken here
        if self.gpus is not None:
            return list(self.gpus)
        return [0 if self.gpu is None else self.gpu]

    @property
    def world_size(self) -> int:
        """Ranks per attempt: one per GPU (more than one means torchrun)."""
        if self.slurm is not None:
            return self.slurm.ranks
        return len(self.gpu_indices)

    @property
    def resolved_model_tag(self) -> str:
        if self.model_tag:
            return self.model_tag
        for p in self.phases:
            depth = p.args.get("depth")
            if isinstance(depth, int):
                return f"d{depth}"
        return "d20"  # nanochat's default depth

    def phase_env(self, index: int) -> dict[str, str]:
        """The job's env with the phase's over it (defaults are the runner's to add)."""
        return {**self.env, **self.phases[index].env}


def json_schema() -> dict:
    """The JSON Schema of a job file (`nanod schema`), for editors."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"nanod job file (schema {SCHEMA_VERSION})"
    # name defaults to the file stem; a one-phase file has a top-level phase: (with args:, phase_env:)
    schema["required"] = []
    schema["anyOf"] = [{"required": ["phases"]}, {"required": ["phase"]}]
    phase = schema["$defs"]["Phase"]["properties"]
    schema["properties"].update({"phase": phase["phase"], "args": phase["args"], "phase_env": phase["env"]})
    return schema


MAX_JOB_FILE_BYTES = 1 << 20


def parse_job(data: object, *, default_name: str) -> JobSpec:
    """A JobSpec from parsed YAML; raises JobFileError with a one-line reason."""
    if data is None:
        raise JobFileError("the file holds no YAML (empty, or only comments)")
    if not isinstance(data, dict):
        raise JobFileError(f"the top level must be a mapping (key: value lines), not a {type(data).__name__}")
    data = dict(data)
    if "phase" in data:  # a one-phase job
        if "phases" in data:
            raise JobFileError("use either a top-level phase: or a phases: list, not both")
        data["phases"] = [{k: data.pop(k) for k in ("phase", "args") if k in data}]
        if "phase_env" in data:
            data["phases"][0]["env"] = data.pop("phase_env")
    if "name" not in data:
        try:
            check_name(default_name)
        except ValueError:
            raise JobFileError(f"the file name {default_name!r} is not a valid job name "
                               "(lowercase a-z, 0-9, '.', '_', '-'); add a name: field or rename the file") from None
        data["name"] = default_name
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise JobFileError(_one_line(e)) from None


def load_job_file(path: Path, *, max_bytes: int = MAX_JOB_FILE_BYTES) -> JobSpec:
    """Read, parse and validate one job file. Raises JobFileError naming the file."""
    path = Path(path)
    try:
        # O_NONBLOCK: `nanod check some.fifo` must not hang waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise JobFileError(f"{path.name}: cannot read: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JobFileError(f"{path.name}: not a regular file")
        raw = read_at_most(fd, max_bytes + 1)
    except OSError as e:
        raise JobFileError(f"{path.name}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    spec = parse_job_bytes(raw, filename=path.name, max_bytes=max_bytes)
    check_notify_urls(spec, path.name)
    return spec


def check_notify_urls(spec: JobSpec, filename: str) -> None:
    """Ask apprise about the job's notify URLs, as far as it can tell without sending.

    For the commands that read a file (`submit`, `check`), never the daemon: loading apprise
    costs ~35 MB of RSS, so the daemon only checks the syntax here and asks apprise from its
    sender subprocess once the job is accepted (a refusal is a notify_failed event).
    """
    if not spec.notify.urls:
        return
    from daemon.notify.deliver import check_urls
    for i, why in enumerate(check_urls(list(spec.notify.urls))):
        if why:
            raise JobFileError(f"{filename}: notify.urls: URL {i + 1}: {why}")


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd`: a huge file is never read whole."""
    chunks, got = [], 0
    while got < limit:
        chunk = os.read(fd, min(65536, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def parse_job_bytes(raw: bytes, *, filename: str, max_bytes: int = MAX_JOB_FILE_BYTES) -> JobSpec:
    """A JobSpec from a job file's bytes; the name defaults to the file name's stem."""
    if len(raw) > max_bytes:
        raise JobFileError(f"{filename}: larger than {max_bytes} bytes; a job file is a few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobFileError(f"{filename}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise JobFileError(f"{filename}: the file is empty")
    try:
        check_yaml_shape(text)
        data = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]
        line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        if "\t" in line[: mark.column + 1 if mark is not None else 0]:
            problem += " (a tab: YAML indents with spaces only)"
        raise JobFileError(f"{filename}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise JobFileError(f"{filename}: invalid YAML: nested too deeply") from None
    stem = filename.rsplit(".", 1)[0]
    try:
        return parse_job(data, default_name=stem)
    except JobFileError as e:
        raise JobFileError(f"{filename}: {e}") from None


# ---- YAML guards ------------------------------------------------------------------
# yaml.safe_load shares aliased nodes, but validating (or dumping) the result walks
# every expansion: ten nested aliases of ten items each ("billion laughs") is 10^10
# nodes. So the event stream is checked first, in one flat pass, before anything is
# built: one document, bounded depth, bounded alias expansion, no duplicate keys
# (PyYAML silently keeps the last one, so a repeated key would be a silent default).
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_YAML_DEPTH = 16            # a plan is ~5 deep (phases -> phase -> args -> value)
MAX_YAML_NODES = 20_000        # after expanding aliases; a plan has ~100


class _YamlShapeError(yaml.YAMLError):
    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


def check_yaml_shape(text: str) -> None:
    """Raise a YAMLError for what safe_load would accept but a job file must not hold."""
    documents, nodes, anchors = 0, 0, {}
    stack: list[list] = []  # per open collection: [nodes inside, anchor, keys seen or None, expecting a key]

    def add_node(size: int, key: object, mark) -> None:
        nonlocal nodes
        nodes += size
        if nodes > MAX_YAML_NODES:
            raise _YamlShapeError(f"more than {MAX_YAML_NODES} values once aliases are expanded "
                                  "(a YAML bomb?)", mark)
        if stack:
            frame = stack[-1]
            frame[0] += size
            if frame[2] is not None:  # a mapping: alternate key, value
                if frame[3] and key is not None:
                    if key in frame[2]:
                        raise _YamlShapeError(f"duplicate key {key!r}", mark)
                    frame[2].add(key)
                frame[3] = not frame[3]

    for event in yaml.parse(text, Loader=_YamlLoader):
        mark = event.start_mark
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _YamlShapeError("more than one YAML document (---); put one job in each file", mark)
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) >= MAX_YAML_DEPTH:
                raise _YamlShapeError(f"nested more than {MAX_YAML_DEPTH} levels deep", mark)
            is_map = isinstance(event, yaml.MappingStartEvent)
            stack.append([1, event.anchor, set() if is_map else None, True])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            size, anchor, _, _ = stack.pop()
            if anchor:
                anchors[anchor] = size
            nodes -= size - 1  # its contents are counted already; add_node adds it whole to its parent
            add_node(size, None, mark)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                anchors[event.anchor] = 1
            add_node(1, event.value, mark)
        elif isinstance(event, yaml.AliasEvent):
            add_node(anchors.get(event.anchor, 1), ("alias", event.anchor), mark)


_UNION_MEMBERS = {"str": "a string", "bool": "true/false", "int": "an integer", "float": "a number"}


def _one_line(e: ValidationError) -> str:
    """The first few errors, each as `field.path: problem (got value)`."""
    found: dict[str, str] = {}
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif loc and loc[-1] in _UNION_MEMBERS and err["type"].endswith("_type"):
            # an arg value fails each member of str | bool | int | float: say it once
            loc, msg = loc[:-1], "must be a string, number or true/false"
        if err["type"] not in ("extra_forbidden", "missing", "value_error") and "input" in err and loc:
            shown = repr(err["input"])
            msg += f" (got {shown if len(shown) <= 40 else shown[:37] + '...'})"
        found.setdefault(".".join(loc), msg)
    parts = [f"{loc}: {msg}" if loc else msg for loc, msg in list(found.items())[:3]]
    more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
    return "; ".join(parts) + more
