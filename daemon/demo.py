"""`make demo`: the tiny CPU plan under a real daemon, in a fresh home under ./.demo/.

Starts `nanod run` as a subprocess (its log in .demo/daemon.log), submits
jobs/examples/tiny-cpu.yaml, prints progress until the job is done or failed,
shows `nanod status`, asks the model it just trained one question (`nanod
sample`, a fixed seed, a few tokens), stops the daemon with SIGTERM (a graceful
stop) and exits 0 when the job is done, else 1. Checkpoints go to .demo/nanochat, so
nothing outside the checkout is touched except the GPU lock, which is shared
on purpose: a demo must not start beside a real training on the same GPU.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "jobs" / "examples" / "tiny-cpu.yaml"
TIMEOUT = 30 * 60.0
# a question of the kind the embedded chat data holds, so even a minute of training answers in kind
SAMPLE_PROMPT = "What does the hen say?"


def main() -> int:
    demo = ROOT / ".demo"
    home, nanochat = demo / "home", demo / "nanochat"
    for d in (home, nanochat):
        shutil.rmtree(d, ignore_errors=True)
    home.mkdir(parents=True, mode=0o700)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(nanochat)}
    env.pop("NANOD_HOME", None)
    env.pop("NANOD_CONFIG", None)
    nanod = [sys.executable, "-m", "daemon.cli", "--home", str(home)]
    log = demo / "daemon.log"
    print(f"demo: home {home}, checkpoints {nanochat}, daemon log {log}")
    with open(log, "wb") as out:
        daemon = subprocess.Popen([*nanod, "run"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        if not _wait_up(home, daemon):
            print(f"demo: the daemon did not start; see {log}:\n{_tail(log)}")
            return 1
        r = subprocess.run([*nanod, "submit", str(PLAN)], env=env, cwd=ROOT, capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr.strip())
        if r.returncode != 0:
            return 1
        rec = _follow(home, daemon, _job_name())
        if (ROOT / "daemon" / "commands" / "status.py").exists():
            print()
            subprocess.run([*nanod, "status"], env=env, cwd=ROOT)
        elif rec is not None:
            print(f"\n{rec.name}: {rec.state.value}: {rec.reason}")
        done = rec is not None and rec.state.value == "done"
        if done:
            _sample(nanod, env, rec.name)
        return 0 if done else 1
    except KeyboardInterrupt:
        return 130
    finally:
        _stop(daemon)


def _sample(nanod: list[str], env: dict, name: str) -> None:
    """What the model just trained says to one question: a few tokens, fixed seed, on the CPU."""
    print(f"\n$ nanod sample {name} --prompt {SAMPLE_PROMPT!r} --seed 0 --max-tokens 16")
    r = subprocess.run([*nanod, "sample", name, "--prompt", SAMPLE_PROMPT, "--seed", "0", "--max-tokens", "16",
                        "--device", "cpu"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        print(f"demo: nanod sample failed: {r.stderr.strip()}")
        return
    print(f"  user:      {SAMPLE_PROMPT}\n  assistant: {r.stdout.strip()}")


def _job_name() -> str:
    from daemon.spec import load_job_file
    return load_job_file(PLAN).name


def _wait_up(home: Path, daemon: subprocess.Popen, timeout: float = 30) -> bool:
    from daemon.atomic import read_json
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.poll() is None:
        info = read_json(home / "state" / "daemon.json")
        if isinstance(info, dict) and info.get("pid") == daemon.pid:
            return True
        time.sleep(0.1)
    return False


def _follow(home: Path, daemon: subprocess.Popen, name: str):
    """Print each change of state and each new step until the job finishes; the final record."""
    from daemon.config import load_settings
    from daemon.queue import load_job
    settings = load_settings(home)
    seen_events, last_line, deadline = 0, "", time.monotonic() + TIMEOUT
    rec = None
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            print(f"demo: the daemon exited with {daemon.returncode}")
            return rec
        rec = load_job(settings, name)
        if rec is not None:
            for ev in rec.events[seen_events:]:
                print(f"  [{ev['kind']}] {ev['message']}")
            seen_events = len(rec.events)
            p = rec.progress or {}
            if p.get("step") is not None and rec.state.value == "running":
                loss = f" loss {p['loss']:.3f}" if p.get("loss") is not None else ""
                tps = f" {p['tok_per_sec']:,.0f} tok/s" if p.get("tok_per_sec") else ""
                line = f"  {p['phase']:<4} step {p['step']}/{p.get('total') or '?'}{loss}{tps}"
                if line != last_line:
                    print(line)
                    last_line = line
            if rec.finished:
                return rec
        time.sleep(1.0)
    print("demo: timed out")
    return rec


def _stop(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
