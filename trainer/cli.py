"""Command-line parsing for `python -m trainer` (stdlib only).

`python -m trainer {base,mid,sft} --key=value ...`: nanochat's flag names,
`--a_b` and `--a-b`, `--k=v` and `--k v`, a bare `--flag` for booleans. Any
mistake raises BadArgs whose str() is one line; __main__ prints it and exits
exitcodes.BAD_ARGS without a traceback, because the daemon shows that line to
a person and must not retry. This module validates values, it does not
resolve defaults that need a checkpoint (train.py does).
"""
from __future__ import annotations

import dataclasses
import textwrap

from trainer.options import AUTO, PHASES, Options, fields_of, known_flags, normalise_flag, sft_row_length


class BadArgs(Exception):
    """A user mistake in flags or data; str() is the one-line reason."""


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_args(argv: list[str]) -> tuple[str, Options, dict]:
    """(phase, options, the flags as given) from argv without the program name."""
    if not argv or argv[0] not in PHASES:
        got = f" (got {argv[0]!r})" if argv else ""
        raise BadArgs(f"the first argument must be the phase: one of {', '.join(PHASES)}{got}; see --help")
    phase, rest = argv[0], argv[1:]
    fields = {f.name: f for f in fields_of()}
    allowed = known_flags(phase)
    given: dict = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or arg == "--":
            raise BadArgs(f"unexpected argument {arg!r}: flags look like --name=value")
        name, eq, value = arg[2:].partition("=")
        key = normalise_flag(name)
        if key not in fields:
            raise BadArgs(f"unknown flag --{name} for phase {phase}; see python -m trainer --help")
        if key not in allowed:
            raise BadArgs(f"flag --{name} does not apply to phase {phase}")
        kind = _kind(fields[key])
        if fields[key].metadata.get("auto"):
            kind = "int|auto"
        if not eq:
            if kind == "bool" and (i + 1 >= len(rest) or rest[i + 1].lower() not in _BOOL_WORDS):
                value = "1"
            elif i + 1 < len(rest):
                i += 1
                value = rest[i]
            else:
                raise BadArgs(f"flag --{name} needs a value")
        if key in given:
            raise BadArgs(f"flag --{name} is given twice")
        given[key] = _convert(name, kind, value)
        i += 1
    if phase == "sft":
        # one setting under two names: kept as max_tokens, which the plan, the meta and resume use
        try:
            row = sft_row_length(given, prefix="--")
        except ValueError as e:
            raise BadArgs(str(e)) from None
        if given.pop("max_seq_len", None) is not None:
            given["max_tokens"] = row
    opts = Options(**given)
    check_values(phase, opts)
    return phase, opts, given


def check_values(phase: str, o: Options) -> None:
    """Values no run could use, refused before anything heavy happens."""
    positive = ["depth", "aspect_ratio", "head_dim", "max_seq_len", "max_tokens", "device_batch_size",
                "total_batch_size", "target_examples_per_step", "num_epochs"]
    for name in positive:
        v = getattr(o, name)
        if v is not None and v != AUTO and v < 1:
            raise BadArgs(f"--{name} must be at least 1, got {v}")
    if o.vocab_size < 256 + 16:
        raise BadArgs(f"--vocab_size must be at least 272 (256 bytes + special tokens), got {o.vocab_size}")
    if o.num_iterations == 0 or o.num_iterations < -1:
        raise BadArgs(f"--num_iterations must be positive or -1, got {o.num_iterations}")
    if o.save_every == 0 or o.save_every < -1:
        raise BadArgs(f"--save_every must be positive or -1, got {o.save_every}")
    for name in ("resume_from_step", "init_step"):
        v = getattr(o, name)
        if v != "auto" and not (v.lstrip("-").isdigit() and int(v) >= -1):
            raise BadArgs(f"--{name} must be a step number or auto, got {v!r}")
    if o.device_type not in ("", "cpu", "cuda", "mps"):
        raise BadArgs(f"--device_type must be cpu, cuda or mps (or empty), got {o.device_type!r}")
    if o.dtype not in ("bfloat16", "float32", "float16"):
        raise BadArgs(f"--dtype must be bfloat16 or float32, got {o.dtype!r}")
    if o.compile not in ("auto", "0", "1"):
        raise BadArgs(f"--compile must be auto, 0 or 1, got {o.compile!r}")
    if o.source not in ("", "base", "mid"):
        raise BadArgs(f"--source must be base or mid, got {o.source!r}")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        v = getattr(o, name)
        if v is not None and not 0.0 <= v <= 1.0:
            raise BadArgs(f"--{name} must be between 0 and 1, got {v}")
    if o.model_tag is not None and (not o.model_tag or "/" in o.model_tag or o.model_tag in (".", "..")):
        raise BadArgs(f"--model_tag {o.model_tag!r} is not a directory name")


def _kind(f: dataclasses.Field) -> str:
    t = str(f.type)
    for kind in ("bool", "int", "float", "str"):
        if t.startswith(kind):
            return kind
    raise AssertionError(f"unhandled option type {t}")


def _convert(name: str, kind: str, value: str):
    if kind == "str":
        return value
    if kind == "int|auto":
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            return int(value.replace("_", ""))
        except ValueError:
            raise BadArgs(f"--{name} must be an integer or auto, got {value!r}") from None
    if kind == "bool":
        if value.lower() not in _BOOL_WORDS:
            raise BadArgs(f"--{name} must be true or false, got {value!r}")
        return _BOOL_WORDS[value.lower()]
    try:
        if kind == "int":
            return int(value.replace("_", ""))
        return float(value)
    except ValueError:
        raise BadArgs(f"--{name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}") from None


def format_help() -> str:
    lines = [
        "usage: python -m trainer {base,mid,sft} [--flag=value ...]",
        "       python -m trainer {sample,chat} --model_tag=TAG [...]   (talk to a checkpoint; see its --help)",
        "",
        "nanod's built-in nanochat-style trainer. base pretrains on text, mid continues on",
        "conversations (all tokens), sft fine-tunes on conversations (assistant tokens only).",
        "Checkpoints go to $NANOCHAT_BASE_DIR/{base,mid,chatsft}_checkpoints/<model_tag>/.",
        "Flags take nanochat's names; --a_b and --a-b, --k=v and --k v are all accepted.",
        "Exit codes: 0 done, 2 bad arguments/data, 3 out of memory, 4 interrupted (checkpoint saved).",
        "",
    ]
    for f in fields_of():
        phases = "all" if len(f.metadata["phases"]) == 3 else ",".join(f.metadata["phases"])
        default = "(phase default)" if f.default is None else repr(f.default)
        unused = "  [accepted, unused]" if not f.metadata["used"] else ""
        lines.append(f"  --{f.name}  [{phases}] default {default}{unused}")
        lines += textwrap.wrap(f.metadata["help"], 88, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "Environment: NANOCHAT_BASE_DIR, TORCH_COMPILE_DISABLE, NANOD_ATTEMPT, NANOD_DISK_RESERVE,",
              "NANOD_DISK_POLL, NANOD_AUTOFIT_TARGET, NANOD_FAULT_* (see docs/architecture.md)."]
    return "\n".join(lines)
