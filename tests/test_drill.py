"""The chaos drill, short: every fault kind once under a real daemon, every promise checked."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PYTHON, ROOT


@pytest.mark.slow
def test_short_drill_keeps_every_promise(tmp_path):
    r = subprocess.run([PYTHON, "-m", "daemon.cli", "drill", "--faults", "7", "--seed", "7",
                        "--workdir", str(tmp_path / "drill")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "FAIL" not in out
    for check in ("final weights bitwise equal", "never two trainers alive at once", "no torn checkpoint"):
        assert f"PASS  {check}" in out, out[-4000:]
