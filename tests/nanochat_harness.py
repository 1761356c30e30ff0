"""Test harness for the nanochat runner: the real nanochat checkouts, and a real daemon over a checkout.

The real nanochat (two commits and an offline data template, see its README) is at
`../shared/nanochat` beside the repository, or where NANOCHAT_SRC says (the
Makefile's variable of the same name); its interpreter is `.venv-nanochat/`, built
by `make nanochat-venv` from its requirements.txt. Tests that need either are
skipped with the reason when it is missing.

Everything runs on copies (the shared folder is read-only). torch.compile's
caches live in `$XDG_CACHE_HOME/nanod-tests` (default `~/.cache/nanod-tests`),
which outlives a run, so that only the first run pays for compiling (minutes on
2 cores). Two things make that work: the runnable checkout is a copy at a path
that outlives the run too (`stable_checkout`: inductor's cache keys include the
source files' paths, so a fresh temporary copy recompiles everything), and the
runs' TMPDIR is in the cache (inductor keeps its precompiled headers there).
Checkpoints and data go to a fresh NANOCHAT_BASE_DIR per test (`copy_base`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, wait_until

SRC = Path(os.environ.get("NANOCHAT_SRC") or ROOT.parent / "shared" / "nanochat")
SRC = SRC if SRC.is_absolute() else ROOT / SRC
INTERPRETER = ROOT / ".venv-nanochat" / "bin" / "python"
ERAS = {"head": "head", "guide": "guide-era"}   # nanochat 92d63d4 (argparse, dashes, no mid), 8c89661 (configurator)
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanod-tests"
# One OpenMP thread: on 2 shared cores two threads spin against each other (measured: a d2 step
# takes ~80 ms with one thread and ~3.5 s with two under load). The compile cache is keyed by it.
RUN_ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"), "TRITON_CACHE_DIR": str(CACHE / "triton"),
           "TMPDIR": str(CACHE / "tmp")}


def missing_source() -> str | None:
    for part in (*ERAS.values(), "base-template"):
        if not (SRC / part).is_dir():
            return f"the real nanochat is not at {SRC / part} (set NANOCHAT_SRC to ../shared/nanochat's place)"
    return None


def missing_interpreter() -> str | None:
    if not os.access(INTERPRETER, os.X_OK):
        return f"no interpreter for the real nanochat at {INTERPRETER} (make nanochat-venv)"
    return None


needs_source = pytest.mark.skipif(missing_source() is not None, reason=missing_source() or "")
needs_interpreter = pytest.mark.skipif((missing_source() or missing_interpreter()) is not None,
                                       reason=missing_source() or missing_interpreter() or "")


def copy_checkout(dest: Path, era: str) -> Path:
    """A writable copy of one era's checkout whose `.venv/bin/python` is this test's Python: enough for
    nanod to read and check the checkout, not to train (stable_checkout is for that)."""
    dest = Path(dest)
    shutil.copytree(SRC / ERAS[era], dest, ignore=shutil.ignore_patterns("__pycache__", ".venv"))
    _make_writable(dest)
    (dest / ".venv" / "bin").mkdir(parents=True)
    (dest / ".venv" / "bin" / "python").symlink_to(sys.executable)
    return dest


def stable_checkout(era: str) -> Path:
    """A runnable copy of one era's checkout (`.venv` -> the real interpreter), made once per source and
    interpreter under the cache and reused by every run: its path is part of torch.compile's cache keys.
    Runs do not change it (nanochat writes under NANOCHAT_BASE_DIR; Python its __pycache__)."""
    src, venv = SRC / ERAS[era], INTERPRETER.parents[1].resolve()
    files = sorted((str(p.relative_to(src)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in src.rglob("*") if p.is_file())
    key = hashlib.sha256(repr((str(src.resolve()), str(venv), files)).encode()).hexdigest()[:12]
    dest = CACHE / "checkouts" / f"{era}-{key}"
    if not dest.is_dir():
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__", ".venv"))
        _make_writable(tmp)
        (tmp / ".venv").symlink_to(venv)
        try:
            tmp.rename(dest)
        except OSError:  # another test session made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def copy_base(dest: Path) -> Path:
    """A fresh NANOCHAT_BASE_DIR: the offline data, tokenizer and task tables (8 MB)."""
    shutil.copytree(SRC / "base-template", dest)
    _make_writable(dest)
    return dest


def run_env(base: Path) -> dict[str, str]:
    """The environment the real scripts need offline, for a daemon (its attempts inherit it)."""
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TMPDIR"):
        Path(RUN_ENV[key]).mkdir(parents=True, exist_ok=True)
    # wandb (imported even with --run=dummy) leaves a few empty temp folders per launch, more when
    # killed: clear the old ones, never another session's live ones
    for junk in Path(RUN_ENV["TMPDIR"]).glob("tmp*wandb-*"):
        try:
            if time.time() - junk.stat().st_mtime > 3600:
                shutil.rmtree(junk, ignore_errors=True)
        except OSError:
            pass
    return {**RUN_ENV, "HF_DATASETS_CACHE": str(base / "huggingface" / "datasets")}


def _make_writable(root: Path) -> None:
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)


def nanod(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `nanod` command on a home, as a user runs it."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--home", str(home), *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


class Daemon:
    """`nanod run` in a temporary home, over one nanochat checkout: its inbox and its job records."""

    def __init__(self, tmp_path: Path, repo: Path, env: dict[str, str], base: Path | None = None):
        self.home, self.nc = tmp_path / "home", base or tmp_path / "nc"
        (self.home / "jobs").mkdir(parents=True, mode=0o700)
        os.chmod(self.home, 0o700)
        self.config = (f'nanochat_repos = ["{repo}"]\nnanochat_base_dir = "{self.nc}"\n'
                       f'lock_dir = "{tmp_path / "locks"}"\ntick_interval = "0.1s"\n')
        (self.home / "config.toml").write_text(self.config)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOD_", "STANDIN_"))}
        self.env.update(env)
        self.out = open(tmp_path / "daemon.out", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--home", str(self.home), "run"],
                                     cwd=ROOT, env=self.env, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def submit(self, name: str, text: str) -> Path:
        """Drop a job file into the inbox (written aside, renamed in)."""
        tmp = self.home / f".{name}.tmp"
        tmp.write_text(text)
        dest = self.home / "jobs" / f"{name}.yaml"
        tmp.rename(dest)
        return dest

    def record(self, name: str) -> dict:
        try:
            return json.loads((self.home / "state/jobs" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_state(self, name: str, state: str, timeout: float = 60) -> dict:
        def reached():
            rec = self.record(name)
            if rec.get("state") in ("failed", "cancelled") and state != rec.get("state"):
                pytest.fail(f"job {name} {rec['state']}: {rec.get('reason')}")
            return rec if rec.get("state") == state else None
        return wait_until(reached, timeout=timeout, interval=0.1, message=f"job {name} {state}")

    def wait_attempt(self, name: str, n: int, timeout: float = 60) -> dict:
        """Attempt n (1-based) once its process is recorded."""
        def started():
            atts = self.record(name).get("attempts", [])
            return atts[n - 1] if len(atts) >= n and atts[n - 1].get("pgid") else None
        return wait_until(started, timeout=timeout, interval=0.05, message=f"attempt {n} of {name}")

    def log(self, attempt: dict) -> str:
        try:
            return (self.home / attempt["log"]).read_text(errors="replace")
        except OSError:
            return ""

    def argvs(self, name: str) -> list[list[str]]:
        """Each attempt's command line, from the header nanod writes at the top of its log."""
        out = []
        for att in self.record(name)["attempts"]:
            header = next(ln for ln in self.log(att).splitlines() if ln.startswith("# nanod: job "))
            out.append(header.split(": ", 2)[2].split())
        return out

    def kill(self, attempt: dict) -> None:
        """kill -9 to the attempt's whole process group."""
        os.killpg(attempt["pgid"], signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for path in (self.home / "state/jobs").glob("*.json"):  # nothing of ours may outlive the test
            for att in json.loads(path.read_text()).get("attempts", []):
                if att.get("pgid") and att.get("ended_at") is None:
                    try:
                        os.killpg(att["pgid"], signal.SIGKILL)
                    except OSError:
                        pass
        self.out.close()


@pytest.fixture
def start_daemon(tmp_path):
    """start_daemon(repo, env=..., base=...) -> a running Daemon, stopped after the test."""
    daemons = []

    def start(repo: Path, env: dict | None = None, base: Path | None = None) -> Daemon:
        d = Daemon(tmp_path, repo, env or {}, base)
        daemons.append(d)
        return d
    yield start
    for d in daemons:
        d.stop()
