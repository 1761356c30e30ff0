"""Claims about the supervisor's decisions (daemon/supervisor.py): pure functions, no processes."""
from __future__ import annotations

import pytest

from daemon.trainers import Outcome
from daemon.spec import Recovery
from daemon.supervisor import Action, backoff_delay, decide, halve_batch, is_stalled, working_batch_size


def after(outcome, *, index=0, phases=3, restarts=0, progressed=False, dbs=8, stopping=False, **recovery):
    return decide(outcome, phase="base", phase_index=index, n_phases=phases, recovery=Recovery(**recovery),
                  restarts_without_progress=restarts, progressed=progressed, device_batch_size=dbs,
                  exit_words="exit 1", error="RuntimeError: boom", stopping=stopping)


def test_a_completed_phase_moves_to_the_next_and_the_last_one_finishes_the_job():
    assert after(Outcome.COMPLETED, index=0).action == Action.NEXT_PHASE
    assert after(Outcome.COMPLETED, index=2).action == Action.DONE


def test_oom_halves_the_batch_and_relaunches_at_once_until_the_floor_fails():
    d = after(Outcome.OOM, dbs=8)
    assert (d.action, d.device_batch_size, d.delay) == (Action.RELAUNCH, 4, 0.0)
    assert after(Outcome.OOM, dbs=2).device_batch_size == 1
    floor = after(Outcome.OOM, dbs=1)
    assert floor.action == Action.FAIL and "device_batch_size 1" in floor.reason


def test_oom_does_not_spend_the_restart_budget():
    assert after(Outcome.OOM, restarts=3, max_restarts_without_progress=3).action == Action.RELAUNCH


@pytest.mark.parametrize("dbs,half", [(8, 4), (6, 3), (5, 1), (12, 6), (3, 1), (2, 1)])
def test_halving_keeps_a_divisor_so_the_total_batch_still_divides(dbs, half):
    assert halve_batch(dbs) == half and dbs % half == 0


def test_a_crash_without_progress_spends_the_budget_and_then_fails_with_the_last_error():
    d = after(Outcome.CRASHED, restarts=0, max_restarts_without_progress=2)
    assert (d.action, d.restarts_without_progress, d.delay) == (Action.RELAUNCH, 1, 0.0)
    d = after(Outcome.CRASHED, restarts=1, max_restarts_without_progress=2)
    assert (d.action, d.restarts_without_progress, d.delay) == (Action.RELAUNCH, 2, 1.0)
    d = after(Outcome.CRASHED, restarts=2, max_restarts_without_progress=2)
    assert d.action == Action.FAIL and "RuntimeError: boom" in d.reason


def test_progress_resets_the_restart_count_and_relaunches_at_once():
    d = after(Outcome.CRASHED, restarts=5, progressed=True, max_restarts_without_progress=2)
    assert (d.action, d.restarts_without_progress, d.delay) == (Action.RELAUNCH, 0, 0.0)


def test_backoff_doubles_from_zero_and_is_capped():
    assert [backoff_delay(n, 5) for n in range(1, 7)] == [0, 1, 2, 4, 5, 5]


def test_a_stall_counts_like_a_crash():
    d = after(Outcome.STALLED, restarts=0)
    assert d.action == Action.RELAUNCH and d.kind == "stalled" and d.restarts_without_progress == 1


def test_bad_arguments_fail_at_once():
    d = after(Outcome.BAD_ARGS, restarts=0)
    assert d.action == Action.FAIL and "RuntimeError: boom" in d.reason


def test_the_daemons_own_stop_requeues_instead_of_failing():
    assert after(Outcome.INTERRUPTED, stopping=True).action == Action.REQUEUE
    assert after(Outcome.CANCELLED).action == Action.CANCEL


def test_a_later_phase_starts_at_the_smaller_of_its_setting_and_what_an_oom_left():
    assert working_batch_size(8, 2) == 2
    assert working_batch_size(1, 2) == 1
    assert working_batch_size(4, None) == 4
    assert working_batch_size(None, 2) == 2


def test_stall_uses_startup_grace_before_the_first_step_and_never_while_paused():
    kw = dict(now=100.0, last_activity=80.0, stall_timeout=10, startup_grace=30)
    assert not is_stalled(saw_step=False, paused=False, **kw)
    assert is_stalled(saw_step=True, paused=False, **kw)
    assert not is_stalled(saw_step=True, paused=True, **kw)
