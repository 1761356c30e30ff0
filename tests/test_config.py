"""Claims about settings: defaults < config.toml < NANOD_* env < --home/flags, errors name the field."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.config import Settings, config_file, default_home, ensure_dirs, load_settings


@pytest.fixture
def home_env(tmp_path, monkeypatch) -> Path:
    """No NANOD_HOME: the default home lives under a temporary XDG_DATA_HOME."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "data" / "nanod"


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)


def test_defaults(home_env, tmp_path):
    s = load_settings()
    assert s.home == home_env == default_home()
    assert s.inbox_dir == home_env / "jobs" and s.state_dir == home_env / "state"
    assert s.lock_dir == tmp_path / "cache" / "nanod" / "locks"
    assert (s.inbox_mode, s.poll_interval, s.rescan_interval, s.settle_time) == ("auto", 1.0, 30.0, 0.5)
    assert s.allow_job_commands is False and s.nanochat_repos == []


def test_config_file_under_home_is_read(home_env):
    write_config(home_env, 'poll_interval = "3s"\ninbox_mode = "polling"\ndisk_min_free = "10GB"\n')
    s = load_settings()
    assert (s.poll_interval, s.inbox_mode, s.disk_min_free) == (3.0, "polling", 10_000_000_000)


def test_nanod_env_overrides_the_file(home_env, monkeypatch):
    write_config(home_env, 'poll_interval = "3s"\ntick_interval = 2\n')
    monkeypatch.setenv("NANOD_POLL_INTERVAL", "5s")
    s = load_settings()
    assert s.poll_interval == 5.0 and s.tick_interval == 2.0


def test_nanod_home_env_picks_the_config_file(tmp_path, monkeypatch):
    write_config(tmp_path / "h", "tick_interval = 4\n")
    monkeypatch.setenv("NANOD_HOME", str(tmp_path / "h"))
    s = load_settings()
    assert s.home == tmp_path / "h" and s.tick_interval == 4.0 and config_file() == tmp_path / "h" / "config.toml"


def test_home_argument_wins_over_nanod_home_and_reads_its_own_file(tmp_path, monkeypatch):
    write_config(tmp_path / "env-home", "tick_interval = 4\n")
    write_config(tmp_path / "flag-home", "tick_interval = 7\n")
    monkeypatch.setenv("NANOD_HOME", str(tmp_path / "env-home"))
    s = load_settings(home=tmp_path / "flag-home")
    assert s.home == tmp_path / "flag-home" and s.tick_interval == 7.0
    assert load_settings().home == tmp_path / "env-home"  # the override does not stick


def test_nanod_config_names_another_file(tmp_path, monkeypatch, home_env):
    (tmp_path / "elsewhere.toml").write_text("tick_interval = 9\n")
    monkeypatch.setenv("NANOD_CONFIG", str(tmp_path / "elsewhere.toml"))
    assert load_settings().tick_interval == 9.0


def test_keyword_overrides_win_over_env(home_env, monkeypatch):
    monkeypatch.setenv("NANOD_TICK_INTERVAL", "3")
    assert load_settings(tick_interval=0.1).tick_interval == 0.1


@pytest.mark.parametrize("env, value, field", [
    ("NANOD_POLL_INTERVAL", "soon", "poll_interval"),
    ("NANOD_INBOX_MODE", "fanotify", "inbox_mode"),
    ("NANOD_DISK_MIN_FREE", "lots", "disk_min_free"),
    ("NANOD_VRAM_WARN_FRACTION", "1.5", "vram_warn_fraction"),
    ("NANOD_SETTLE_TIME", "0", "settle_time"),
])
def test_a_bad_env_setting_names_the_field(home_env, monkeypatch, env, value, field):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as e:
        load_settings()
    assert e.value.errors()[0]["loc"] == (field,)


def test_a_bad_or_unknown_file_setting_names_the_field(home_env):
    write_config(home_env, 'rescan_interval = "often"\n')
    with pytest.raises(ValidationError, match="rescan_interval"):
        load_settings()
    write_config(home_env, "poll_intervall = 2\n")
    with pytest.raises(ValidationError, match="poll_intervall"):
        load_settings()


def test_tilde_in_paths_is_expanded(home_env, monkeypatch):
    write_config(home_env, 'inbox = "~/my-jobs"\nnanochat_repos = ["~/nanochat"]\n')
    s = load_settings()
    assert s.inbox_dir == Path.home() / "my-jobs" and s.nanochat_repos == [Path.home() / "nanochat"]


def test_lists_come_from_env_as_json(home_env, monkeypatch):
    monkeypatch.setenv("NANOD_NANOCHAT_REPOS", '["/a", "/b"]')
    assert load_settings().nanochat_repos == [Path("/a"), Path("/b")]


def test_settings_are_frozen(home_env):
    with pytest.raises(ValidationError):
        load_settings().tick_interval = 3


def test_ensure_dirs_makes_0700_dirs(tmp_path):
    s = Settings(home=tmp_path / "home", lock_dir=tmp_path / "locks")
    ensure_dirs(s)
    ensure_dirs(s)  # twice is fine
    for d in (s.home, s.state_dir, s.logs_dir, s.health_dir, s.requests_dir, s.inbox_dir, s.lock_dir):
        assert d.is_dir() and stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_ensure_dirs_tightens_an_existing_home(tmp_path):
    (tmp_path / "home").mkdir(mode=0o755)
    (tmp_path / "home").chmod(0o755)
    ensure_dirs(Settings(home=tmp_path / "home", lock_dir=tmp_path / "locks"))
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700


def test_checkpoint_root_follows_the_setting_then_nanochat_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    assert Settings(home=tmp_path).checkpoint_root == tmp_path / "nc"
    assert Settings(home=tmp_path, nanochat_base_dir=tmp_path / "x").checkpoint_root == tmp_path / "x"
    monkeypatch.delenv("NANOCHAT_BASE_DIR")
    assert Settings(home=tmp_path).checkpoint_root == Path.home() / ".cache" / "nanochat"
