"""Promise 12 in the source itself: no unpickling of arbitrary objects, no shell.

The runtime halves (a job file cannot name a command, 0600/0700, the inbox
writable by others) are tested where they live: test_nanochat_runner, test_queue,
test_config, test_inbox.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOURCES = sorted(p for d in ("daemon", "trainer", "bench") for p in (ROOT / d).rglob("*.py"))


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def name_of(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_torch_load_is_weights_only_and_nothing_runs_a_shell(path):
    for call in calls(path):
        name = name_of(call.func)
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        if name.endswith("torch.load"):
            value = keyword(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{where}: torch.load without weights_only=True"
        shell = keyword(call, "shell")
        assert not (isinstance(shell, ast.Constant) and shell.value), f"{where}: shell=True"
        assert name not in ("os.system", "os.popen", "pickle.load", "pickle.loads"), f"{where}: {name}"


def test_the_scan_sees_the_code():
    assert any(p.name == "checkpoint.py" for p in SOURCES) and len(SOURCES) > 30
