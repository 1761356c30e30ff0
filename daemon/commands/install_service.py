"""`nanod install-service`: write the systemd user unit for this installation and home.

The unit is systemd/nanod.service with its ExecStart line replaced by this
installation's nanod (the console script beside this interpreter, else
`python -m daemon.cli`) and `run --home <home>`, absolute and quoted for
systemd. Settings from the environment that the service would not see
(NANOCHAT_BASE_DIR, NANOD_*) are carried as Environment= lines. It does not run
systemctl: it prints the commands, because enabling a service is the user's call.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

NAME = "install-service"
HELP = "write the systemd user unit (~/.config/systemd/user/nanod.service)"

TEMPLATE = Path(__file__).resolve().parents[2] / "systemd" / "nanod.service"
UNIT_NAME = "nanod.service"
CARRIED_ENV = ("NANOCHAT_BASE_DIR",)  # plus every NANOD_* but NANOD_HOME (the unit passes --home)


def add_arguments(parser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the unit and where it would go; write nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing, different unit file")


def run(args, settings) -> int:
    from daemon.cli import UserError
    try:
        template = TEMPLATE.read_text()
    except OSError as e:
        raise UserError(f"cannot read the unit template {TEMPLATE}: {e.strerror or e}") from None
    unit = render_unit(template, nanod_argv(settings), carried_env())
    path = unit_path()
    if args.dry_run:
        print(f"# would write {path}")
        sys.stdout.write(unit)
        print()
        print(next_steps(path))
        return 0
    try:
        existing = path.read_text()
    except FileNotFoundError:
        existing = None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if existing == unit:
        print(f"{path} is already installed and up to date")
    elif existing is not None and not args.force:
        raise UserError(f"{path} exists and differs; --force replaces it (--dry-run shows the new one)")
    else:
        from daemon.atomic import write_bytes_atomic
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, unit.encode(), mode=0o644)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        print(f"wrote {path}")
    print(next_steps(path))
    return 0


def unit_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser().absolute() / "systemd" / "user" / UNIT_NAME


def nanod_argv(settings) -> list[str]:
    """This installation's nanod, absolute; a venv's bin/ path is kept, not resolved out of the venv."""
    python = os.path.abspath(sys.executable)
    script = os.path.join(os.path.dirname(python), "nanod")
    exe = [script] if os.access(script, os.X_OK) else [python, "-m", "daemon.cli"]
    return exe + ["run", "--home", str(Path(settings.home).expanduser().absolute())]


def carried_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if (k in CARRIED_ENV or k.startswith("NANOD_")) and k != "NANOD_HOME" and v}
    return dict(sorted(keep.items()))


def quote_arg(arg: str) -> str:
    """One ExecStart word: % and $ are systemd's specifiers and variables, so they are doubled."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in ' \t\n"\'\\;'):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_env(key: str, value: str) -> str:
    text = f"{key}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{text}"'


def render_unit(template: str, argv: list[str], env: dict[str, str]) -> str:
    """The template with ExecStart= filled in and the carried environment after its Environment= lines."""
    if any("\n" in a for a in argv) or any("\n" in f"{k}{v}" for k, v in env.items()):
        from daemon.cli import UserError
        raise UserError("a path or variable contains a newline; systemd cannot take it")
    exec_line = "ExecStart=" + " ".join(quote_arg(a) for a in argv)
    out, done_exec = [], False
    for line in template.splitlines():
        if line.startswith("# placeholder"):
            out.append("# written by `nanod install-service`; run it again after moving nanod or its home")
            continue
        if line.startswith("ExecStart="):
            out.append(exec_line)
            done_exec = True
            continue
        out.append(line)
        if line.startswith("Environment=PYTHONUNBUFFERED"):
            out.extend(quote_env(k, v) for k, v in env.items())
    if not done_exec:
        raise ValueError("the unit template has no ExecStart= line")
    return "\n".join(out) + "\n"


def next_steps(path: Path) -> str:
    wsl = _is_wsl()
    systemd_pid1 = _read("/proc/1/comm").strip() == "systemd"
    lines = [
        "",
        "Next:",
        "  systemctl --user daemon-reload",
        "  systemctl --user enable --now nanod     # start it now and at every login",
        "  loginctl enable-linger $USER            # keep it running when you log out, start it at boot",
        "  journalctl --user -u nanod -f           # the daemon's own log",
        "  nanod status",
    ]
    if not systemd_pid1:
        lines += ["", "Note: systemd is not running as PID 1 here, so systemctl --user will not work yet."]
    lines += [
        "",
        ("This is WSL2:" if wsl else "Under WSL2:"),
        "  - enable systemd: in /etc/wsl.conf put",
        "      [boot]",
        "      systemd=true",
        "    then run `wsl --shutdown` from Windows and open the distribution again;",
        "  - the WSL VM stops when idle even with services running: in %UserProfile%\\.wslconfig put",
        "      [wsl2]",
        "      vmIdleTimeout=-1",
        "  - keep the inbox and the checkpoints on the Linux filesystem (not /mnt/c): /mnt/c gets no",
        "    inotify events (nanod falls back to polling and says so in `nanod status`) and is slow.",
    ]
    return "\n".join(lines)


def _is_wsl() -> bool:
    return "microsoft" in _read("/proc/sys/kernel/osrelease").lower() or bool(os.environ.get("WSL_DISTRO_NAME"))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
