"""Settings: defaults < <home>/config.toml (or $NANOD_CONFIG) < NANOD_* env < --home/flags.

Every path nanod uses derives from here, so a test or a demo that points
`home` at a temporary directory touches nothing else. This module only resolves
settings; creating directories and their permissions is `ensure_dirs`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from daemon.notify.events import DEFAULT_ON, MAX_URLS, check_events, check_url_syntax
from daemon.paths import DerivedPaths, config_path, default_home, default_lock_dir
from daemon.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _list_from_text(v: object) -> object:
    """NANOD_NOTIFY_URLS / NANOD_NOTIFY_ON from the environment: a JSON list, or words split on commas and spaces."""
    if isinstance(v, str):
        import json
        text = v.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise ValueError("is not a valid JSON list") from None
        return [w for w in text.replace(",", " ").split() if w]
    return v


def _argv_from_text(v: object) -> object:
    """NANOD_NOTIFY_COMMAND: a JSON list only; splitting a string would be a shell's job, and there is none."""
    if isinstance(v, str):
        import json
        try:
            v = json.loads(v) if v.strip().startswith("[") else v
        except ValueError:
            raise ValueError("is not a valid JSON list") from None
        if isinstance(v, str):
            raise ValueError('must be a list (an argv, e.g. ["/usr/bin/notify-send", "nanod"]); '
                             "it never goes through a shell")
    return v


TextList = Annotated[list[str], NoDecode, BeforeValidator(_list_from_text)]
Argv = Annotated[list[str], NoDecode, BeforeValidator(_argv_from_text)]


class Settings(DerivedPaths, BaseSettings):
    """nanod's settings. Env: NANOD_<FIELD> (e.g. NANOD_HOME, NANOD_HEALTH_INTERVAL=30s)."""

    model_config = SettingsConfigDict(env_prefix="NANOD_", extra="forbid", frozen=True)

    home: Path = Field(default_factory=default_home)  # nanod's own files: state, logs, health, inbox
    inbox: Path | None = None                # job files are dropped here; default <home>/jobs
    nanochat_base_dir: Path | None = None    # checkpoints; default $NANOCHAT_BASE_DIR or ~/.cache/nanochat
    lock_dir: Path = Field(default_factory=default_lock_dir)  # gpu<N>.lock, shared with `nanod exec` and other tools
    inbox_mode: Literal["auto", "inotify", "polling"] = "auto"  # auto: inotify, polling where it hears nothing
    poll_interval: Duration = 1.0            # inbox polling period when polling
    rescan_interval: Duration = 30.0         # full inbox rescan even with inotify (events can be dropped)
    settle_time: Duration = 0.5              # a file written in place is read once unchanged this long
    tick_interval: Duration = 0.5            # the daemon loop's period when nothing wakes it sooner
    health_interval: Duration = 30.0         # scheduled health snapshots
    health_history: Duration = 86400.0       # how much snapshot history to keep
    vram_warn_fraction: float = Field(0.9, gt=0, le=1)  # VRAM used above this is a warning
    disk_min_free: Size = 5_000_000_000      # free disk below this is a warning (the guide's 5 GB)
    ram_min_free: Size = 1_000_000_000       # free host RAM below this is a warning
    disk_margin: Size = 1_000_000_000        # added to the projected need of the disk guard
    python: str | None = None                # interpreter for the built-in trainer; default: this one
    allow_job_commands: bool = False         # may job files name their own interpreter/checkout (runner: nanochat)?
    nanochat_repos: list[Path] = Field(default_factory=list)  # checkouts job files may use without allow_job_commands
    notify_urls: TextList = Field(default_factory=list, max_length=MAX_URLS)  # apprise URLs for every job's events
    notify_command: Argv = Field(default_factory=list)  # argv run on each event (NANOD_EVENT, ...); never a shell
    notify_on: TextList = Field(default_factory=lambda: list(DEFAULT_ON))  # which events go to the two above
    notify_timeout: Duration = Field(10.0, gt=0, le=300)  # one send (a URL, the command); a slow target is retried
    slurm_poll_interval: Duration = 5.0      # how often a SLURM attempt's state is asked (scontrol show job)

    @field_validator("notify_urls", mode="after")
    @classmethod
    def _notify_urls(cls, v: list[str]) -> list[str]:
        return [check_url_syntax(u, f"URL {i + 1}") for i, u in enumerate(v)]

    @field_validator("notify_command", mode="after")
    @classmethod
    def _notify_argv(cls, v: list[str]) -> list[str]:
        if v and not v[0].strip():
            raise ValueError("the program (its first item) must not be empty")
        if any("\0" in a for a in v):
            raise ValueError("an argument holds a NUL character")
        return v

    @field_validator("notify_on", mode="after")
    @classmethod
    def _notify_on(cls, v: list[str]) -> list[str]:
        return check_events(v)

    @field_validator("home", "inbox", "nanochat_base_dir", "lock_dir", mode="after")
    @classmethod
    def _expand_user(cls, v: Path | None) -> Path | None:
        # `inbox = "~/jobs"` in config.toml, or Environment=NANOD_HOME=~/x in a unit, where no shell expands ~
        return v.expanduser() if v is not None else None

    @field_validator("nanochat_repos", mode="after")
    @classmethod
    def _expand_users(cls, v: list[Path]) -> list[Path]:
        return [p.expanduser() for p in v]

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return (init_settings, env_settings, toml)


_HOME_OVERRIDE: Path | None = None


def config_file() -> Path:
    """$NANOD_CONFIG, else <home>/config.toml (home from --home, NANOD_HOME or the default)."""
    return config_path(_HOME_OVERRIDE)


def load_settings(home: Path | str | None = None, **overrides) -> Settings:
    """Settings for this process; `home` (from --home) wins over NANOD_HOME and the file."""
    global _HOME_OVERRIDE
    _HOME_OVERRIDE = Path(home).expanduser().resolve() if home else None
    try:
        cacheable = not overrides  # tests pass overrides; they never describe the user's settings
        if _HOME_OVERRIDE:
            overrides["home"] = _HOME_OVERRIDE
        settings = Settings(**overrides)
        if cacheable:
            from daemon.settings_cache import write_cache
            paths = [name for name, f in Settings.model_fields.items() if "Path" in str(f.annotation)]
            write_cache(home, settings.model_dump(mode="json"), paths)
        return settings
    finally:
        _HOME_OVERRIDE = None


def ensure_dirs(settings: Settings) -> None:
    """Create nanod's directories 0700 (promise 12). The inbox is checked by the inbox."""
    for d in (settings.home, settings.state_dir, settings.logs_dir, settings.health_dir,
              settings.requests_dir, settings.inbox_dir, settings.lock_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for d in (settings.home, settings.state_dir, settings.logs_dir, settings.health_dir, settings.requests_dir):
        os.chmod(d, 0o700)
