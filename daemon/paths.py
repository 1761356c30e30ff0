"""The paths nanod derives from its settings: one definition for Settings and its cached form.

Stdlib only, so a command that answers from the settings cache
(daemon/settings_cache.py) never imports pydantic.
"""
from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "nanod"


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/nanod (~/.cache/nanod): per user and machine, whatever the home."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "nanod"


def default_lock_dir() -> Path:
    # per user and machine, shared by every home: the GPU is one whatever the home
    return user_cache_dir() / "locks"


def bootstrap_home(home: Path | str | None) -> Path:
    """Where config.toml and the cache live: --home, else NANOD_HOME, else the default."""
    if home:
        return Path(home).expanduser().resolve()
    if os.environ.get("NANOD_HOME"):
        return Path(os.environ["NANOD_HOME"]).expanduser()
    return default_home()


def config_path(home: Path | str | None) -> Path:
    """$NANOD_CONFIG, else <home>/config.toml (home from --home, NANOD_HOME or the default)."""
    if os.environ.get("NANOD_CONFIG"):
        return Path(os.environ["NANOD_CONFIG"]).expanduser()
    return bootstrap_home(home) / "config.toml"


class DerivedPaths:
    """Mixed into anything with `home`, `inbox`, `nanochat_base_dir` and `lock_dir`."""

    @property
    def inbox_dir(self) -> Path:
        return self.inbox or self.home / "jobs"

    @property
    def checkpoint_root(self) -> Path:
        if self.nanochat_base_dir:
            return self.nanochat_base_dir
        env = os.environ.get("NANOCHAT_BASE_DIR")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def health_dir(self) -> Path:
        return self.home / "health"

    @property
    def requests_dir(self) -> Path:
        return self.home / "requests"

    def gpu_lock_path(self, gpu: int) -> Path:
        return self.lock_dir / f"gpu{gpu}.lock"
