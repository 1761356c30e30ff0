"""Sending one notification: apprise URLs through a short-lived subprocess, the operator's command.

Why a subprocess for apprise: loading its ~190 plugins costs ~35 MB of RSS and ~0.2 s, which
the daemon (idle target < 60 MB) must not carry; a process can also be killed at a hard
deadline, which a thread stuck in a plugin cannot. `send_urls` runs
`python -m daemon.notify.deliver`, writes the request as JSON on its stdin and reads one JSON
line per URL back; each URL is sent in its own thread there with apprise's connect and read
timeouts set to the send timeout, and the whole process is killed when it outlives that by
SPAWN_ALLOWANCE; one whose daemon died while it started sends nothing (the next daemon sends
the message again). The operator's command (`run_command`) is an argv list, never a shell, in
its own process group, killed at the timeout.

This module sends and reports; it does not retry, schedule or record anything (notifier.py
does). `check_urls` is what apprise thinks of URLs without sending: for `nanod submit`,
`nanod check` and `nanod notify --test`, never for the daemon process itself.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.notify.events import mask_url

SPAWN_ALLOWANCE = 15.0   # s over the send timeout for the subprocess to start and import apprise
ERROR_TAIL_BYTES = 2048  # of a failed command's output, for its error line
# systemd's variables are the daemon's: a command that inherited NOTIFY_SOCKET could speak for nanod
_DROPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # where `daemon` is importable from


@dataclass
class Result:
    """How one target took one message."""

    target: str             # shown in events and `nanod notify --test`: a masked URL, or the command
    ok: bool
    error: str = ""
    permanent: bool = False  # retrying cannot help (apprise refused the URL itself)
    seconds: float = 0.0


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(extra or {})
    return env


# ---- the daemon's side ----------------------------------------------------------------
def send_urls(urls: list[str], *, title: str, body: str, notify_type: str = "info", timeout: float = 10.0,
              python: str | None = None) -> list[Result]:
    """Send one message to each URL (in parallel, in one subprocess); one Result per URL, in order."""
    if not urls:
        return []
    request = {"mode": "send", "urls": urls, "title": title, "body": body, "type": notify_type, "timeout": timeout,
               "parent": os.getpid()}
    return _run_child(request, urls, timeout + SPAWN_ALLOWANCE, python)


def check_urls_in_child(urls: list[str], *, python: str | None = None, timeout: float = 30.0) -> list[Result]:
    """`check_urls` in a subprocess, for a process that must not load apprise itself (the daemon)."""
    return _run_child({"mode": "check", "urls": urls}, urls, timeout, python) if urls else []


def _run_child(request: dict, urls: list[str], deadline: float, python: str | None) -> list[Result]:
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen([python or sys.executable, "-m", "daemon.notify.deliver"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=_PACKAGE_ROOT,
                                env=child_env(), start_new_session=True)
    except OSError as e:
        return [Result(mask_url(u), False, f"cannot start the sender: {e.strerror or e}") for u in urls]
    killed = False
    try:
        out, err = proc.communicate(json.dumps(request).encode(), timeout=deadline)
    except subprocess.TimeoutExpired:
        killed = True
        _kill_group(proc)
        out, err = proc.communicate()
    seconds = time.monotonic() - t0
    results: dict[int, Result] = {}
    for line in out.decode(errors="replace").splitlines():
        try:
            r = json.loads(line)
            results[int(r["i"])] = Result(str(r["target"]), bool(r["ok"]), str(r.get("error", "")),
                                          bool(r.get("permanent")), seconds)
        except (ValueError, KeyError, TypeError):
            continue
    why = (f"timed out after {deadline:.0f}s (the sender was killed)" if killed else
           _last_line(err) or f"the sender exited {proc.returncode} without an answer")
    return [results.get(i) or Result(mask_url(u), False, why, seconds=seconds) for i, u in enumerate(urls)]


def run_command(argv: list[str], env: dict[str, str], *, timeout: float = 10.0, cwd: Path | None = None) -> Result:
    """Run the operator's command once (no shell), with `env` over the daemon's environment."""
    label = " ".join(argv)[:80]
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=child_env(env),
                                    cwd=cwd, start_new_session=True)
        except OSError as e:
            return Result(label, False, f"{argv[0]}: {e.strerror or e}")
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            return Result(label, False, f"timed out after {timeout:g}s (killed)", seconds=time.monotonic() - t0)
        output.seek(max(0, output.seek(0, os.SEEK_END) - ERROR_TAIL_BYTES))
        tail = output.read()
    seconds = time.monotonic() - t0
    if code != 0:
        said = _last_line(tail)
        words = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        return Result(label, False, f"{words}{': ' + said if said else ''}", seconds=seconds)
    return Result(label, True, seconds=seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # start_new_session: its pid is its group
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(raw: bytes) -> str:
    lines = [ln.strip() for ln in raw.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# ---- apprise (this process or the subprocess) --------------------------------------------
class _Captured(logging.Handler):
    """apprise says why it refused a URL or a send only in its log: keep the last word per thread."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.last: dict[int, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.last[record.thread] = record.getMessage()


def _apprise():
    """apprise, its log captured and kept off stderr; its persistent store in memory (no files)."""
    import apprise
    logger = logging.getLogger("apprise")
    handler = next((h for h in logger.handlers if isinstance(h, _Captured)), None)
    if handler is None:
        handler = _Captured()
        logger.addHandler(handler)
        logger.propagate = False
    asset = apprise.AppriseAsset(app_id="nanod", app_desc="nanod training daemon", storage_mode="memory")
    return apprise, asset, handler


def _instantiate(apprise, asset, handler: _Captured, url: str):
    """(plugin, None) or (None, why apprise refused the URL)."""
    me = threading.get_ident()
    handler.last.pop(me, None)
    try:
        plugin = apprise.Apprise.instantiate(url, asset=asset)
    except Exception as e:  # a plugin's constructor is third-party code
        plugin, handler.last[me] = None, str(e)
    if plugin is not None:
        return plugin, None
    why = handler.last.get(me) or "unknown scheme or missing fields"
    return None, f"apprise cannot use {mask_url(url)}: {' '.join(why.replace(url, '').split()) or 'refused'}"


def check_urls(urls: list[str]) -> list[str | None]:
    """For each URL, None when apprise can send to it (as far as it can tell without sending), else why not."""
    if not urls:
        return []
    try:
        apprise, asset, handler = _apprise()
    except ImportError:
        return ["apprise is not installed (pip install apprise)"] * len(urls)
    return [_instantiate(apprise, asset, handler, u)[1] for u in urls]


def _send_in_child(req: dict, emit) -> None:
    apprise, asset, handler = _apprise()
    if req.get("parent") and os.getppid() != req["parent"]:
        # the daemon died while this process loaded apprise: it cannot mark a delivery any more and
        # the next daemon sends the message again, so sending it now would only make it twice
        return
    timeout = float(req.get("timeout", 10.0))
    notify_type = {"success": apprise.NotifyType.SUCCESS, "failure": apprise.NotifyType.FAILURE,
                   "warning": apprise.NotifyType.WARNING}.get(req.get("type"), apprise.NotifyType.INFO)
    threads = []
    for i, url in enumerate(req["urls"]):
        plugin, why = _instantiate(apprise, asset, handler, url)
        if plugin is None:
            emit({"i": i, "target": mask_url(url), "ok": False, "error": why, "permanent": True})
            continue
        plugin.socket_connect_timeout = plugin.socket_read_timeout = timeout
        target = plugin.url(privacy=True).split("?", 1)[0][:120]   # apprise's own masked form

        def send(i=i, url=url, plugin=plugin, target=target):
            try:
                ok = bool(plugin.notify(body=req["body"], title=req["title"], notify_type=notify_type))
                error = "" if ok else handler.last.get(threading.get_ident(), "apprise reported a failure")
            except Exception as e:  # third-party code: a failure of this target, not of the others
                ok, error = False, f"{type(e).__name__}: {e}"
            emit({"i": i, "target": target, "ok": ok, "error": error.replace(url, target)})

        t = threading.Thread(target=send, daemon=True)
        t.start()
        threads.append((i, target, t))
    deadline = time.monotonic() + timeout + 1.0
    for i, target, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            emit({"i": i, "target": target, "ok": False, "error": f"timed out after {timeout:g}s"})


def main() -> int:
    """The subprocess: a request on stdin, one JSON line per URL on stdout."""
    req = json.loads(sys.stdin.buffer.read())
    lock, sent = threading.Lock(), set()

    def emit(result: dict) -> None:
        with lock:   # one line per URL, the first word wins (a late thread after its timeout is not heard)
            if result["i"] not in sent:
                sent.add(result["i"])
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()

    if req.get("mode") == "check":
        for i, (url, why) in enumerate(zip(req["urls"], check_urls(req["urls"]))):
            emit({"i": i, "target": mask_url(url), "ok": why is None, "error": why or "", "permanent": True})
    else:
        try:
            _send_in_child(req, emit)
        except ImportError:
            print("apprise is not installed (pip install apprise)", file=sys.stderr)
            return 1
    sys.stdout.flush()
    os._exit(0)   # a thread still stuck in a plugin past its timeout must not hold the process


if __name__ == "__main__":
    sys.exit(main())
