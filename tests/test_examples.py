"""Every shipped plan in jobs/examples/ is a valid job file, and the 8 GB one is the guide's plan."""
from __future__ import annotations

import pytest

from daemon.spec import load_job_file

from conftest import ROOT

EXAMPLES = sorted((ROOT / "jobs" / "examples").glob("*.y*ml"))


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"8gb-4060.yaml", "24gb.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path):
    spec = load_job_file(path)
    assert [p.phase for p in spec.phases]  # at least one phase, in order (checked by the spec)


def test_8gb_plan_is_the_safety_guides():
    spec = load_job_file(ROOT / "jobs" / "examples" / "8gb-4060.yaml")
    base, mid, sft = spec.phases
    assert base.args == {"depth": 8, "device_batch_size": 2, "max_seq_len": 1024, "num_iterations": 3520,
                         "save_every": 250, "core_metric_every": -1}
    assert mid.args == {"device_batch_size": 4, "max_seq_len": 1024, "num_iterations": 500, "save_every": 100,
                        "eval_every": -1}
    assert sft.args == {"device_batch_size": 2, "max_tokens": 1024, "num_iterations": 200, "save_every": 100,
                        "eval_every": -1}
    assert spec.env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert spec.phase_env(1)["TORCH_COMPILE_DISABLE"] == "1" and spec.phase_env(2)["TORCH_COMPILE_DISABLE"] == "1"
    assert "TORCH_COMPILE_DISABLE" not in spec.phase_env(0)
    assert spec.retention.keep_last == 3
    r = spec.recovery
    assert (r.max_restarts_without_progress, r.stall_timeout, r.startup_grace, r.oom_backoff) == (3, 600, 900, True)


def test_24gb_plan_leaves_systemd_time_for_its_emergency_checkpoint():
    from test_systemd import directives, seconds
    from daemon.commands.install_service import TEMPLATE
    spec = load_job_file(ROOT / "jobs" / "examples" / "24gb.yaml")
    stop = seconds(directives(TEMPLATE.read_text())["TimeoutStopSec"][0])
    assert spec.recovery.kill_grace + 60 <= stop
