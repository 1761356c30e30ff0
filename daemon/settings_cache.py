"""Settings for quick read-only commands, without importing pydantic (`nanod status` in < 0.3 s).

Importing pydantic-settings costs about 0.2 s, most of status's budget. A full
load (daemon/config.py) writes what it resolved to `<home>/state/settings.json`,
keyed by everything that could change the result: the variables the settings
read, the config file's identity (path, inode, size, mtime) and this code's
version. A command that asks for `quick_settings` with the same key gets those
values back as plain attributes; any difference, or no cache, means a full load
(which writes the cache for next time). Nothing here decides a setting.

The cache lives in `<home>/state/` once the home is in use. A home where no
daemon has run yet has no state directory, and a read-only command creates
nothing in a home (a mistyped --home must not leave one behind), so its entry
goes to the user's cache instead, `$XDG_CACHE_HOME/nanod/settings-cache.json`,
which keeps the last USER_CACHE_HOMES such homes: `nanod status`, a new user's
first command, is then as quick there as in a used home.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from daemon.paths import DerivedPaths, bootstrap_home, config_path, user_cache_dir

CACHE_NAME = "settings.json"
USER_CACHE_NAME = "settings-cache.json"   # under user_cache_dir(): homes without a state directory yet
USER_CACHE_HOMES = 16                     # entries it keeps (the most recently written)
_ENV_PREFIXES = ("NANOD_",)
_ENV_NAMES = ("NANOCHAT_BASE_DIR", "XDG_DATA_HOME", "XDG_CACHE_HOME", "HOME")


class CachedSettings(DerivedPaths):
    """Settings' values as a full load resolved them (paths as Path objects)."""

    def __init__(self, values: dict, path_fields: list[str]):
        for key, value in values.items():
            if key in path_fields and value is not None:
                value = [Path(v) for v in value] if isinstance(value, list) else Path(value)
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError("settings are read-only")


def cache_key(home: Path | str | None, config_path: Path) -> dict:
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES}
    try:
        st = config_path.stat()
        config = [str(config_path), st.st_ino, st.st_size, st.st_mtime_ns]
    except OSError:
        config = [str(config_path), None]
    code = [Path(__file__).with_name(n).stat().st_mtime_ns for n in ("config.py", "paths.py", "settings_cache.py")]
    return {"home": str(home) if home else None, "env": env, "config": config, "code": code}


def read_cache(home: Path | str | None) -> CachedSettings | None:
    state = bootstrap_home(home) / "state"
    if state.is_dir():
        data = _read_json(state / CACHE_NAME)
    else:
        entries = _read_json(user_cache_dir() / USER_CACHE_NAME)
        data = entries.get(str(bootstrap_home(home))) if isinstance(entries, dict) else None
    if not isinstance(data, dict) or data.get("key") != cache_key(home, config_path(home)):
        return None
    return CachedSettings(data["values"], data["path_fields"])


def write_cache(home: Path | str | None, values: dict, path_fields: list[str]) -> None:
    """Best effort: into the home's state directory, else into the user's cache (never creating a home)."""
    from daemon.atomic import write_json_atomic
    state = bootstrap_home(home) / "state"
    payload = {"key": cache_key(home, config_path(home)), "values": values, "path_fields": path_fields}
    if state.is_dir():
        path, old = state / CACHE_NAME, None
        whole = payload
    else:
        path = user_cache_dir() / USER_CACHE_NAME
        old = _read_json(path)
        entries = dict(old) if isinstance(old, dict) else {}
        name = str(bootstrap_home(home))
        if entries.get(name) != payload:
            entries.pop(name, None)
            entries[name] = payload   # last = newest: the oldest entries go first
        whole = dict(list(entries.items())[-USER_CACHE_HOMES:])
    if (old if old is not None else _read_json(path)) == whole:
        return  # every command loads settings: rewrite (and fsync) only what changed
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(path, whole)
    except OSError:
        pass


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def quick_settings(home: Path | str | None = None):
    """The cached settings when still valid, else a full load (which refreshes the cache)."""
    cached = read_cache(home)
    if cached is not None:
        return cached
    from daemon.config import load_settings
    return load_settings(home)
