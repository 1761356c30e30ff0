"""Quick settings for read-only commands: the values a full load resolved, never stale, without pydantic."""
from __future__ import annotations

import json
import subprocess

from daemon.config import load_settings
from daemon.settings_cache import CachedSettings, quick_settings
from tests.conftest import PYTHON, ROOT


def make_home(tmp_path, config: str = ""):
    home = tmp_path / "home"
    (home / "state").mkdir(parents=True)
    (home / "config.toml").write_text(config)
    return home


def test_a_full_load_leaves_values_that_quick_settings_returns_unchanged(tmp_path):
    home = make_home(tmp_path, 'health_interval = "10s"\nnanochat_repos = ["/srv/nanochat"]\n')
    full = load_settings(home)
    quick = quick_settings(home)
    assert isinstance(quick, CachedSettings)
    for name in type(full).model_fields:
        assert getattr(quick, name) == getattr(full, name), name
    for derived in ("inbox_dir", "state_dir", "logs_dir", "health_dir", "checkpoint_root"):
        assert getattr(quick, derived) == getattr(full, derived)
    assert quick.gpu_lock_path(1) == full.gpu_lock_path(1)


def test_quick_settings_never_import_pydantic(tmp_path):
    home = make_home(tmp_path)
    load_settings(home)
    code = ("import sys; from daemon.settings_cache import quick_settings; s = quick_settings(sys.argv[1]); "
            "print(type(s).__name__, 'pydantic' in sys.modules)")
    out = subprocess.run([PYTHON, "-c", code, str(home)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["CachedSettings", "False"]


def test_an_edited_config_file_or_a_changed_variable_is_never_answered_from_the_cache(tmp_path, monkeypatch):
    home = make_home(tmp_path, 'health_interval = "10s"\n')
    load_settings(home)
    (home / "config.toml").write_text('health_interval = "20s"\n')
    assert quick_settings(home).health_interval == 20.0
    monkeypatch.setenv("NANOD_HEALTH_INTERVAL", "40s")
    assert quick_settings(home).health_interval == 40.0


def test_a_home_no_daemon_has_used_is_answered_from_the_users_cache_and_stays_uncreated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    home = tmp_path / "nowhere"
    assert not isinstance(quick_settings(home), CachedSettings)   # the first look: a full load
    second = quick_settings(home)
    assert isinstance(second, CachedSettings) and second.home == home and second.inbox_dir == home / "jobs"
    assert not home.exists(), "a read-only command creates nothing in a home"
    path = tmp_path / "cache" / "nanod" / "settings-cache.json"
    assert path.stat().st_mode & 0o777 == 0o600 and list(json.loads(path.read_text())) == [str(home)]
    monkeypatch.setenv("NANOD_INBOX", str(tmp_path / "elsewhere"))
    assert quick_settings(home).inbox_dir == tmp_path / "elsewhere", "a changed variable is never answered stale"


def test_the_users_cache_keeps_only_the_most_recent_unused_homes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from daemon import settings_cache
    homes = [tmp_path / f"h{i}" for i in range(settings_cache.USER_CACHE_HOMES + 3)]
    for h in homes:
        load_settings(h)
    kept = json.loads((tmp_path / "cache" / "nanod" / "settings-cache.json").read_text())
    assert list(kept) == [str(h) for h in homes[3:]]


def test_status_in_a_home_no_daemon_has_used_skips_pydantic_from_the_second_look(tmp_path):
    env_code = ("import os, sys, io, contextlib; os.environ['XDG_CACHE_HOME'] = sys.argv[2];"
                "from daemon.cli import main\n"
                "with contextlib.redirect_stdout(io.StringIO()): rc = main(['--home', sys.argv[1], 'status'])\n"
                "print(rc, 'pydantic' in sys.modules)")
    argv = [PYTHON, "-c", env_code, str(tmp_path / "fresh"), str(tmp_path / "cache")]
    runs = [subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60) for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["0", "True"], ["0", "False"]], [r.stderr for r in runs]
    assert not (tmp_path / "fresh").exists()


def test_the_cache_is_private(tmp_path):
    home = make_home(tmp_path)
    load_settings(home)
    path = home / "state" / "settings.json"
    assert path.stat().st_mode & 0o777 == 0o600 and json.loads(path.read_text())["values"]["home"] == str(home)


def test_an_unchanged_load_does_not_rewrite_the_cache(tmp_path):
    home = make_home(tmp_path)
    load_settings(home)
    path = home / "state" / "settings.json"
    before = path.stat().st_ino, path.stat().st_mtime_ns
    load_settings(home)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == before
