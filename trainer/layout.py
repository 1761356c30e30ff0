"""Where checkpoints live and when one is complete (stdlib only).

The one definition of the on-disk checkpoint format, nanochat's layout:

    $NANOCHAT_BASE_DIR/{base,mid,chatsft}_checkpoints/<model_tag>/
        model_%06d.pt  optim_%06d_rank%d.pt  meta_%06d.json

A checkpoint is *complete* only when its meta file exists and parses as a JSON
object and the model file (and each rank's optimizer file, where expected) is
there and whole. A checkpoint saved by a group of N ranks under torchrun records
`nanod.world_size` (and `nanod.optim_ranks`) N in its meta, so it is complete
only with all N `optim_<step>_rank<r>.pt` files. Writers write every file to a
hidden temp name, fsync and rename, meta last. (nanochat's own scripts do not:
they write straight to the final names, model, meta, then optimizer, so a kill -9
during the optimizer write leaves a meta beside a half-written file. A torch file
is a zip archive, whole only once its end record is written: that is checked too.)
Both resume (trainer) and retention (daemon) call `is_complete`, so there
is one idea of "complete". This module never deletes anything.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints"}
# the phase a phase starts from (sft falls back to base when there was no mid)
PREVIOUS_PHASES = {"base": (), "mid": ("base",), "sft": ("mid", "base")}

_STEP_FILE = re.compile(r"^(?:model|meta|optim)_(\d{6})(?:_rank\d+)?\.(?:pt|json)$")
TEMP_PREFIX = "."  # temp files are hidden: ".model_000250.pt.<pid>.tmp"
TEMP_SUFFIX = ".tmp"


def base_dir() -> Path:
    """NANOCHAT_BASE_DIR, or ~/.cache/nanochat as nanochat uses."""
    env = os.environ.get("NANOCHAT_BASE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"


def checkpoint_dir(root: Path, phase: str, model_tag: str) -> Path:
    return Path(root) / PHASE_DIRS[phase] / model_tag


def model_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"model_{step:06d}.pt"


def meta_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"meta_{step:06d}.json"


def optim_path(ckpt_dir: Path, step: int, rank: int = 0) -> Path:
    return Path(ckpt_dir) / f"optim_{step:06d}_rank{rank:d}.pt"


def temp_path(final: Path) -> Path:
    """The hidden name a file is written under before its rename."""
    final = Path(final)
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{os.getpid()}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    name = Path(path).name
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def list_steps(ckpt_dir: Path) -> list[int]:
    """Every step with at least one checkpoint file, complete or not, ascending."""
    try:
        names = os.listdir(ckpt_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    steps = {int(m.group(1)) for m in map(_STEP_FILE.match, names) if m}
    return sorted(steps)


def files_of(ckpt_dir: Path, step: int) -> list[Path]:
    """Every file that belongs to one checkpoint (model, meta, each rank's optim)."""
    prefix = (f"model_{step:06d}.", f"meta_{step:06d}.", f"optim_{step:06d}_rank")
    try:
        names = os.listdir(ckpt_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(ckpt_dir) / n for n in names if _STEP_FILE.match(n) and n.startswith(prefix))


def read_meta(ckpt_dir: Path, step: int) -> dict | None:
    """The parsed meta, or None when it is missing, torn or not a JSON object."""
    try:
        with open(meta_path(ckpt_dir, step), "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def expected_ranks(meta: dict) -> int:
    """How many optimizer files a checkpoint should have (nanod's trainer records it: one per rank)."""
    nanod = meta.get("nanod") if isinstance(meta.get("nanod"), dict) else {}
    ranks = nanod.get("optim_ranks", nanod.get("world_size", 1))
    return ranks if isinstance(ranks, int) and not isinstance(ranks, bool) and ranks >= 0 else 1


def world_size(meta: dict) -> int:
    """How many ranks saved the checkpoint (1 for a single process and for metas older than ranks)."""
    nanod = meta.get("nanod") if isinstance(meta.get("nanod"), dict) else {}
    size = nanod.get("world_size", 1)
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else 1


def why_incomplete(ckpt_dir: Path, step: int, *, optim_ranks: int | None = None) -> str | None:
    """None when the checkpoint is complete, else a few words saying why not.

    Complete: the meta parses, the model file and each expected rank's optimizer
    file are there and non-empty, and, where the meta records file sizes (nanod's
    trainer does; nanochat does not), every file has its recorded size, which
    catches a file truncated after the fact.
    optim_ranks: how many `optim_<step>_rank<r>.pt` files must exist; None takes
    it from the meta (1 when the meta does not say), 0 requires none.
    """
    meta = read_meta(ckpt_dir, step)
    if meta is None:
        return "meta missing or unreadable"
    if not _non_empty(model_path(ckpt_dir, step)):
        return "model file missing or empty"
    ranks = expected_ranks(meta) if optim_ranks is None else optim_ranks
    for r in range(ranks):
        if not _non_empty(optim_path(ckpt_dir, step, r)):
            return f"optimizer file of rank {r} missing or empty"
    for path in [model_path(ckpt_dir, step)] + [optim_path(ckpt_dir, step, r) for r in range(ranks)]:
        if _torn_zip(path):
            return f"{path.name} is cut short (a torch file without its zip end record: still being written?)"
    nanod = meta.get("nanod") if isinstance(meta.get("nanod"), dict) else {}
    files = nanod.get("files") if isinstance(nanod.get("files"), dict) else {}
    for name, size in files.items():
        if not isinstance(name, str) or not _STEP_FILE.match(name):
            continue  # only this checkpoint's own names; never a path from the meta
        try:
            actual = (Path(ckpt_dir) / name).stat().st_size
        except OSError:
            return f"{name} missing"
        if actual != size:
            return f"{name} is {actual} bytes, the meta says {size} (truncated?)"
    return None


def is_complete(ckpt_dir: Path, step: int, *, optim_ranks: int | None = None) -> bool:
    """True when `why_incomplete` finds nothing wrong."""
    return why_incomplete(ckpt_dir, step, optim_ranks=optim_ranks) is None


def complete_steps(ckpt_dir: Path, *, optim_ranks: int | None = None) -> list[int]:
    return [s for s in list_steps(ckpt_dir) if is_complete(ckpt_dir, s, optim_ranks=optim_ranks)]


def latest_complete(ckpt_dir: Path, *, optim_ranks: int | None = None) -> int | None:
    """The newest complete step, or None. Incomplete newer ones are skipped."""
    for step in reversed(list_steps(ckpt_dir)):
        if is_complete(ckpt_dir, step, optim_ranks=optim_ranks):
            return step
    return None


def size_of(ckpt_dir: Path, step: int) -> int:
    """Bytes on disk of one checkpoint's files."""
    total = 0
    for p in files_of(ckpt_dir, step):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def _torn_zip(path: Path) -> bool:
    """A zip archive (torch.save's format) whose end-of-central-directory record is not at its end:
    a save cut off, or still being written. torch writes no archive comment, so a whole file ends
    with the 22-byte record. Files that do not start like a zip (older formats) are not judged."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
            f.seek(-22, os.SEEK_END)
            end = f.read(22)
    except OSError:
        return True  # shorter than a zip's end record
    return not (end.startswith(b"PK\x05\x06") and end[20:22] == b"\x00\x00")


def _non_empty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False
