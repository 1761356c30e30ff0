"""The chaos drill, short: every fault kind once under a real daemon, every promise checked."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PYTHON, ROOT


@pytest.mark.slow
def test_short_drill_keeps_every_promise(tmp_path):
    r = subprocess.run([PYTHON, "-m", "daemon.cli", "drill", "--faults", "5", "--seed", "7",
                        "--workdir", str(tmp_path / "drill")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "FAIL" not in out
    for check in ("final weights bitwise equal", "never two trainers alive at once", "no torn checkpoint"):
        assert f"PASS  {check}" in out, out[-4000:]
    assert "faults injected: 5 of 5" in out, out[-4000:]


# ---- sizing and counting, without running anything ---------------------------------------------
from daemon import drill as drill_mod  # noqa: E402


def test_the_schedule_holds_exactly_the_faults_asked_for_of_kinds_this_machine_can_inject(tmp_path):
    d = drill_mod.Drill(seed=5, faults=24, workdir=tmp_path)
    d.tmpfs = False   # no small filesystem (not root): a disk_full could only be skipped
    kinds = d.schedule()
    assert len(kinds) == 24 and "disk_full" not in kinds
    assert set(kinds) == set(drill_mod.FAULTS) - {"disk_full"}
    d = drill_mod.Drill(seed=5, faults=24, workdir=tmp_path)
    d.tmpfs = True
    assert len(d.schedule()) == 24 and set(d.schedule()) == set(drill_mod.FAULTS)


def test_the_plan_gives_every_fault_room_to_land_at_the_measured_step_time(tmp_path):
    for step_s in (0.02, 0.05, 0.2):
        d = drill_mod.Drill(seed=5, faults=24, workdir=tmp_path, step_seconds=step_s)
        steps = sum(p["args"]["num_iterations"] for p in d.plan()["phases"])
        per_fault = drill_mod.FAULT_STEPPING_S / step_s + drill_mod.SAVE_EVERY
        assert steps >= 24 * per_fault, (step_s, steps)
    short = drill_mod.Drill(seed=5, faults=1, workdir=tmp_path, step_seconds=10.0)
    base, mid, sft = drill_mod.PLAN_UNIT
    tail = -(-sum(drill_mod.PLAN_UNIT) // 4)   # TAIL_SHARE of the nominal plan, after the faults
    assert [p["args"]["num_iterations"] for p in short.plan()["phases"]] == [base, mid, sft + tail]


def test_the_report_counts_the_faults_that_landed_and_says_why_the_rest_did_not(tmp_path):
    d = drill_mod.Drill(seed=5, faults=4, workdir=tmp_path, step_seconds=0.04)
    d.tmpfs = True
    d.records = [drill_mod.FaultRecord("kill_trainer", 1.0, took=1.0),
                 drill_mod.FaultRecord("disk_full", 2.0, took=0.0, landed=False, note="the job never paused")]
    line = d.injected_line()
    assert line.startswith("faults injected: 1 of 4 (")
    assert "disk_full: the job never paused" in line and "2 never tried: the job ended first" in line
    d.records = [drill_mod.FaultRecord("bad_files", float(i), took=0.1) for i in range(4)]
    assert d.injected_line() == "faults injected: 4 of 4"


def test_the_faults_are_spread_over_every_phase_of_the_plan(tmp_path):
    d = drill_mod.Drill(seed=5, faults=7, workdir=tmp_path, step_seconds=0.05)
    base, mid, sft = (p["args"]["num_iterations"] for p in d.plan()["phases"])
    due = [d.due_step(i) for i in range(7)]
    assert due == sorted(due) and due[0] == 0
    assert any(base <= s < base + mid for s in due) and due[-1] >= base + mid, (due, base, mid, sft)
    assert base + mid + sft - due[-1] >= 0.25 * d.nominal_steps(), "slack is left after the last fault"
    (d.home / "state" / "jobs").mkdir(parents=True)
    (d.home / "state" / "jobs" / "drill.json").write_text(
        '{"phase_index": 1, "progress": {"phase": "mid", "step": 5}}')
    assert d.steps_into_plan() == base + 5


def test_a_fault_whose_attempt_just_ended_goes_to_the_next_attempt_instead_of_being_skipped(tmp_path):
    class PhaseEndsFirst(drill_mod.Drill):   # the first try meets an attempt that has just ended
        tried = 0

        def _inject(self, kind):
            self.tried += 1
            if self.tried == 1:
                raise ProcessLookupError
            return drill_mod.FaultRecord(kind, 1.0, took=0.5)

    d = PhaseEndsFirst(seed=5, faults=1, workdir=tmp_path)
    fr = d.inject("kill_trainer")
    assert fr.landed and d.tried == 2
