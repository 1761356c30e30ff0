"""The systemd user unit: the template and what `nanod install-service` writes both pass
`systemd-analyze verify`, with the directives the daemon's stop and watchdog rely on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.commands.install_service import TEMPLATE, quote_arg, render_unit
from daemon.spec import Recovery


ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def seconds(value: str) -> float:
    """A systemd time span such as 60s, 5min, 1h."""
    import re
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)\s*([a-z]*)", value))


NANOD = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit: Path, tmp_path: Path) -> str:
    """systemd-analyze verify --user; works without systemd as PID 1 given a runtime dir.
    Returns the debug dump (which shows the parsed command line); fails on any warning."""
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    quiet = subprocess.run([ANALYZE, "verify", "--user", str(unit)], capture_output=True, text=True, env=env,
                           timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    assert unit.name + ":" not in quiet.stderr, quiet.stderr  # e.g. "Unknown key ..., ignoring" is rc 0
    dump = subprocess.run([ANALYZE, "verify", "--user", str(unit)], capture_output=True, text=True,
                          env={**env, "SYSTEMD_LOG_LEVEL": "debug"}, timeout=60)
    return dump.stdout + dump.stderr


def install(tmp_path: Path, home: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), **(env_extra or {})}
    return subprocess.run([*NANOD, "--home", str(home), "install-service", *extra],
                          capture_output=True, text=True, env=env, timeout=60)


def test_template_has_what_the_daemon_relies_on():
    d = directives(TEMPLATE.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["KillMode"] == ["mixed"] and d["Restart"] == ["on-failure"] and d["RestartSec"]
    assert seconds(d["WatchdogSec"][0]) >= 30
    assert "PYTHONUNBUFFERED=1" in d["Environment"]
    assert d["WantedBy"] == ["default.target"]
    # SIGTERM -> emergency checkpoint takes up to kill_grace; systemd must not SIGKILL before that
    assert seconds(d["TimeoutStopSec"][0]) >= Recovery().kill_grace + 60


@needs_analyze
def test_template_passes_systemd_analyze_verify(tmp_path):
    verify(TEMPLATE, tmp_path)


def test_dry_run_prints_the_unit_and_the_next_commands_and_writes_nothing(tmp_path):
    home = tmp_path / "home"
    out = install(tmp_path, home, "--dry-run")
    assert out.returncode == 0, out.stderr
    exec_line = next(line for line in out.stdout.splitlines() if line.startswith("ExecStart="))
    first = exec_line.removeprefix("ExecStart=").split()[0]
    assert os.path.isabs(first) and os.access(first, os.X_OK)
    assert exec_line.endswith(f"run --home {home}")
    for step in ("systemctl --user daemon-reload", "systemctl --user enable --now nanod",
                 "loginctl enable-linger", "journalctl --user -u nanod -f", "systemd=true", "vmIdleTimeout=-1"):
        assert step in out.stdout
    assert not (tmp_path / "config").exists()


@needs_analyze
def test_installed_unit_passes_verify_and_quotes_an_awkward_home(tmp_path):
    home = tmp_path / "my home" / "100%"  # ($ is doubled too; the dump shows it escaped, see the unit test)
    out = install(tmp_path, home, env_extra={"NANOCHAT_BASE_DIR": str(tmp_path / "nano chat")})
    assert out.returncode == 0, out.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "nanod.service"
    assert f"wrote {unit}" in out.stdout
    dump = verify(unit, tmp_path)
    # systemd parsed the home back as one word, with % and $ intact
    assert f'run --home "{home}"' in dump, dump[-3000:]
    assert f"NANOCHAT_BASE_DIR={tmp_path / 'nano chat'}" in dump


def test_install_is_idempotent_and_refuses_to_overwrite_without_force(tmp_path):
    home = tmp_path / "home"
    assert install(tmp_path, home).returncode == 0
    again = install(tmp_path, home)
    assert again.returncode == 0 and "already installed" in again.stdout
    other = install(tmp_path, tmp_path / "other-home")
    assert other.returncode == 2 and "--force" in other.stderr and "Traceback" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    forced = install(tmp_path, tmp_path / "other-home", "--force")
    assert forced.returncode == 0
    unit = (tmp_path / "config" / "systemd" / "user" / "nanod.service").read_text()
    assert f"--home {tmp_path / 'other-home'}" in unit


def test_exec_words_are_quoted_for_systemd():
    assert quote_arg("/usr/bin/nanod") == "/usr/bin/nanod"
    assert quote_arg("/a b/c") == '"/a b/c"'
    assert quote_arg("50%") == "50%%" and quote_arg("$HOME") == "$$HOME"
    assert quote_arg('say "hi"') == '"say \\"hi\\""'
    unit = render_unit("[Service]\nExecStart=x\nEnvironment=PYTHONUNBUFFERED=1\n", ["/p/nanod", "run"], {"A": "1 2"})
    assert "ExecStart=/p/nanod run\n" in unit and 'Environment="A=1 2"' in unit


def test_nanod_run_tells_systemd_ready_then_watchdog_then_stopping(tmp_path):
    """End to end under a real NOTIFY_SOCKET, as Type=notify with WatchdogSec= sets it up."""
    import signal
    import socket
    import time

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000",
           "NANOD_LOCK_DIR": str(tmp_path / "locks"), "NANOCHAT_BASE_DIR": str(tmp_path / "nanochat")}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([*NANOD, "--home", str(tmp_path / "home"), "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []

    def receive_until(word: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(word in m.split("\n") for m in seen):
            assert time.monotonic() < deadline, f"no {word} from nanod run within {timeout}s (got {seen})"
            assert proc.poll() is None, proc.stderr.read()
            try:
                seen.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
    try:
        receive_until("READY=1", 30)
        receive_until("WATCHDOG=1", 10)
        proc.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1", 30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    order = [w for m in seen for w in m.split("\n") if w in ("READY=1", "STOPPING=1")]
    assert order[0] == "READY=1" and order[-1] == "STOPPING=1"
