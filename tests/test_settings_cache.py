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


def test_a_home_that_does_not_exist_gets_no_cache_and_a_full_load(tmp_path):
    home = tmp_path / "nowhere"
    assert not isinstance(quick_settings(home), CachedSettings)
    assert not home.exists(), "a read-only command creates nothing"


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
