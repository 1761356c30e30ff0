"""The `nanod` command: a global --home, then one subcommand from daemon/commands/.

Each command lives in its own small module (NAME, HELP, add_arguments, run) so
the parser is a list, not a file that grows with every feature. A UserError is
one line on stderr and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module names under daemon/commands/, in the order `nanod --help` lists them
COMMANDS = ["run", "status", "submit", "list", "cancel", "retry", "logs", "checkpoints", "prune",
            "check", "exec", "schema", "plot", "sample", "chat", "install_service", "drill", "notify"]


class UserError(Exception):
    """A mistake the user can fix; str() is the one-line message."""


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="nanod", description="Keeps a small-GPU training plan running unattended.")
    parser.add_argument("--home", metavar="DIR", help="nanod's home (default $NANOD_HOME or ~/.local/share/nanod)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"daemon.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"daemon.commands.{name}":
                continue  # not built yet
            raise
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        p.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        mod.add_arguments(p)
        modules[mod.NAME] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if getattr(modules[args.command], "QUICK_SETTINGS", False):  # read-only and fast: see settings_cache
            from daemon.settings_cache import quick_settings
            settings = quick_settings(args.home)
        else:
            from daemon.config import load_settings
            settings = load_settings(args.home)
        return int(modules[args.command].run(args, settings) or 0)
    except UserError as e:
        print(f"nanod {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # settings errors from pydantic are user errors too
        line = setting_error(e)
        if line is None:
            raise
        print(f"nanod: {line}", file=sys.stderr)
        return 2


def setting_error(e: Exception) -> str | None:
    """One line for a bad setting (config.toml or NANOD_*), or None when `e` is something else."""
    import re

    from pydantic import ValidationError
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        return f"bad setting {loc}: {first['msg'].removeprefix('Value error, ')}"
    try:
        from pydantic_settings import SettingsError
    except ImportError:
        return None
    if isinstance(e, SettingsError):  # a NANOD_* list or table that is not JSON, say
        m = re.search(r'field "(\w+)" from source "(\w+)"', str(e))
        if m and m.group(2) == "EnvSettingsSource":
            return f"bad setting {m.group(1)}: NANOD_{m.group(1).upper()} must be JSON (e.g. [\"a\", \"b\"])"
        return f"bad setting: {str(e).splitlines()[0]}"
    return None


if __name__ == "__main__":
    # run as `python -m daemon.cli`: dispatch through the imported module so that
    # commands raising daemon.cli.UserError meet the same class that main() catches
    from daemon.cli import main as _main
    sys.exit(_main())
