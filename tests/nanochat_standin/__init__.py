"""A STAND-IN for a nanochat checkout, for what the real scripts cannot show on a CPU (no torch, no GPU).

`make_checkout(dest)` builds a fake checkout from the files beside this one:
`common/` (the `nanochat/` package: the engine and the loops) plus `dash/`
(base_train and chat_sft with nanochat 92d63d4's argparse flags), and an
interpreter link `.venv/bin/python` -> this Python, as a user's checkout would
have. It exists for CUDA out-of-memory texts, several ranks' optimizer files and
a kill -9 in the middle of a save; everything else is tested against the real
nanochat (tests/test_nanochat_real.py). See README.md for the knobs it takes.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_checkout(dest: Path) -> Path:
    """Copy the stand-in checkout into `dest` (created) and return it."""
    dest = Path(dest)
    shutil.copytree(HERE / "common", dest, dirs_exist_ok=True)
    shutil.copytree(HERE / "dash", dest, dirs_exist_ok=True)
    for junk in dest.rglob("__pycache__"):
        shutil.rmtree(junk, ignore_errors=True)
    venv = dest / ".venv" / "bin"
    venv.mkdir(parents=True, exist_ok=True)
    os.symlink(sys.executable, venv / "python")
    return dest
