"""Settings for quick read-only commands, without importing pydantic (`nanod status` in < 0.3 s).

Importing pydantic-settings costs about 0.2 s, most of status's budget. A full
load (daemon/config.py) writes what it resolved to `<home>/state/settings.json`,
keyed by everything that could change the result: the variables the settings
read, the config file's identity (path, inode, size, mtime) and this code's
version. A command that asks for `quick_settings` with the same key gets those
values back as plain attributes; any difference, or no cache, means a full load
(which writes the cache for next time). Nothing here decides a setting.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from daemon.paths import DerivedPaths, bootstrap_home, config_path

CACHE_NAME = "settings.json"
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
    path = bootstrap_home(home) / "state" / CACHE_NAME
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != cache_key(home, config_path(home)):
        return None
    return CachedSettings(data["values"], data["path_fields"])


def write_cache(home: Path | str | None, values: dict, path_fields: list[str]) -> None:
    """Best effort, and only into a home that exists already: a read-only command creates nothing."""
    from daemon.atomic import write_json_atomic
    state = bootstrap_home(home) / "state"
    if not state.is_dir():
        return
    payload = {"key": cache_key(home, config_path(home)), "values": values, "path_fields": path_fields}
    try:
        if json.loads((state / CACHE_NAME).read_bytes()) == payload:
            return  # every command loads settings: rewrite (and fsync) only what changed
    except (OSError, ValueError):
        pass
    try:
        write_json_atomic(state / CACHE_NAME, payload)
    except OSError:
        pass


def quick_settings(home: Path | str | None = None):
    """The cached settings when still valid, else a full load (which refreshes the cache)."""
    cached = read_cache(home)
    if cached is not None:
        return cached
    from daemon.config import load_settings
    return load_settings(home)
