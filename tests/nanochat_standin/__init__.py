"""A STAND-IN for a nanochat checkout, for tests that CI can run (no torch, no GPU).

`make_checkout(dest, era)` builds a fake checkout from the files beside this one:
`common/` (the `nanochat/` package: the engine and the loops) plus one flavour:

  dash        argparse with dash-style flags, base_train and chat_sft only (nanochat 92d63d4, 2026-07)
  underscore  the configurator (--key=value, underscore names), with mid_train (nanochat 507d542, 2026-01-04)

and an interpreter link `.venv/bin/python` -> this Python, as a user's checkout
would have. See README.md for what it mimics and the knobs it takes.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ERAS = ("dash", "underscore")


def make_checkout(dest: Path, era: str) -> Path:
    """Copy the stand-in checkout of `era` into `dest` (created) and return it."""
    if era not in ERAS:
        raise ValueError(f"era must be one of {ERAS}, not {era!r}")
    dest = Path(dest)
    shutil.copytree(HERE / "common", dest, dirs_exist_ok=True)
    shutil.copytree(HERE / era, dest, dirs_exist_ok=True)
    for junk in dest.rglob("__pycache__"):
        shutil.rmtree(junk, ignore_errors=True)
    venv = dest / ".venv" / "bin"
    venv.mkdir(parents=True, exist_ok=True)
    os.symlink(sys.executable, venv / "python")
    return dest
