"""Claims about the durable queue (daemon/queue.py)."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from daemon import queue as q
from daemon.config import ensure_dirs, load_settings
from daemon.queue import FINISHED, TRANSITIONS, IllegalTransition, JobState, Queue
from daemon.spec import parse_job

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def settings(nanod_home):
    s = load_settings(nanod_home)
    ensure_dirs(s)
    return s


def spec(name: str, priority: int = 0):
    return parse_job({"priority": priority, "phases": [{"phase": "base", "args": {"num_iterations": 4}}]},
                     default_name=name)


def test_fifo_within_a_priority_and_higher_priority_first(settings):
    queue = Queue(settings)
    for name, prio in (("a", 0), ("b", 0), ("urgent", 5), ("c", 0)):
        queue.add(spec(name, prio), source=f"{name}.yaml")
    assert [r.name for r in queue.ordered()] == ["urgent", "a", "b", "c"]
    assert [r.name for r in q.list_jobs(settings)] == ["urgent", "a", "b", "c"]


def test_a_new_queue_object_reads_the_same_order_back_from_disk(settings):
    queue = Queue(settings)
    for name in ("x", "y", "z"):
        queue.add(spec(name))
    queue.requeue_front(queue.get("z"), "interrupted")  # z: queued -> queued at the head
    assert [r.name for r in Queue(settings).ordered()] == ["z", "x", "y"]


def test_every_state_change_goes_through_the_transitions_table(settings):
    queue = Queue(settings)
    rec = queue.add(spec("j"))
    with pytest.raises(IllegalTransition):
        queue.transition(rec, JobState.DONE, "cannot finish without running")
    queue.transition(rec, JobState.RUNNING, "started")
    queue.transition(rec, JobState.DONE, "finished")
    with pytest.raises(IllegalTransition):
        queue.transition(rec, JobState.RUNNING, "a done job never runs again")
    assert q.load_job(settings, "j").state == JobState.DONE


def test_the_transitions_table_names_every_state_and_finished_states_only_go_back_to_queued():
    assert set(TRANSITIONS) == set(JobState)
    for state in FINISHED:
        assert TRANSITIONS[state] <= {JobState.QUEUED}


def test_a_duplicate_name_of_an_unfinished_job_is_refused_but_a_finished_one_is_replaced(settings):
    queue = Queue(settings)
    rec = queue.add(spec("dup"))
    with pytest.raises(q.DuplicateJob, match="already queued"):
        queue.add(spec("dup"))
    queue.transition(rec, JobState.CANCELLED, "by hand")
    again = queue.add(spec("dup"))
    assert again.state == JobState.QUEUED and again.seq > rec.seq


def test_records_are_0600_in_a_0700_directory_and_written_whole(settings):
    queue = Queue(settings)
    queue.add(spec("perm"))
    path = q.record_path(settings, "perm")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.state_dir.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["schema"] == 1
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]


def test_events_are_bounded_and_carry_time_attempt_kind_message(settings):
    queue = Queue(settings)
    rec = queue.add(spec("chatty"))
    for i in range(q.MAX_EVENTS + 50):
        queue.note(rec, "restart", f"restart {i}", attempt=i)
    ev = q.load_job(settings, "chatty").events
    assert len(ev) == q.MAX_EVENTS
    assert set(ev[-1]) == {"at", "attempt", "kind", "message"} and ev[-1]["message"] == f"restart {q.MAX_EVENTS + 49}"


def test_global_events_file_is_trimmed_when_it_grows(settings):
    for i in range(3000):
        q.append_event(settings, "rejected", "x" * 100 + str(i), file="f.yaml")
    lines = (settings.state_dir / "events.jsonl").read_text().splitlines()
    assert len(lines) <= q.GLOBAL_EVENTS_KEEP + 2000
    assert json.loads(lines[-1])["message"].endswith("2999")


def test_schema_1_state_file_keeps_loading(settings):
    q.jobs_dir(settings).mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "state-v1-job.json", q.jobs_dir(settings) / "fixture-v1.json")
    rec = q.load_job(settings, "fixture-v1")
    assert rec is not None and rec.state == JobState.RUNNING and rec["state"] == "running"
    assert rec.job_spec.name == "fixture-v1" and [p.phase for p in rec.job_spec.phases] == ["base", "mid", "sft"]
    assert rec.phase_final_steps == {"base": 20, "mid": 10} and rec.last_attempt.n == 3
    assert rec.to_dict().keys() >= json.loads((FIXTURES / "state-v1-job.json").read_text()).keys()


def test_an_unreadable_record_is_skipped_not_fatal(settings):
    Queue(settings).add(spec("good"))
    (q.jobs_dir(settings) / "torn.json").write_text('{"schema": 1, "name": "to')
    assert [r.name for r in q.list_jobs(settings)] == ["good"]


def test_requests_are_taken_once_in_order(settings):
    q.write_request(settings, "cancel", "a")
    q.write_request(settings, "retry", "b")
    assert [(r["action"], r["job"]) for r in q.take_requests(settings)] == [("cancel", "a"), ("retry", "b")]
    assert q.take_requests(settings) == []
    assert not os.listdir(settings.requests_dir)
