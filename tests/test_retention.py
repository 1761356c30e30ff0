"""Retention: keep-last-N over real (tiny, fake) checkpoint files; retention never loads torch files."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from daemon import retention
from daemon.atomic import write_json_atomic
from daemon.queue import Attempt, JobRecord, JobState
from daemon.spec import parse_job
from daemon.retention import plan_prune, prune_dir
from trainer import layout

from conftest import PYTHON, ROOT

OLD = time.time() - 2 * retention.DEBRIS_AGE


def write_ckpt(d: Path, step: int, *, model=b"m" * 100, optim=b"o" * 50, ranks=1, meta: object = "auto",
               nanod=True, mtime: float | None = None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    files = []
    if model is not None:
        layout.model_path(d, step).write_bytes(model)
        files.append(layout.model_path(d, step))
    for r in range(ranks if optim is not None else 0):
        layout.optim_path(d, step, r).write_bytes(optim)
        files.append(layout.optim_path(d, step, r))
    if meta == "auto":
        meta = {"step": step, "model_config": {"n_layer": 2}}
        if nanod:
            meta["nanod"] = {"optim_ranks": ranks}
    if meta is not None:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        layout.meta_path(d, step).write_text(text)
        files.append(layout.meta_path(d, step))
    if mtime is not None:
        for f in files:
            os.utime(f, (mtime, mtime))


def fifty(d: Path) -> list[int]:
    steps = [s * 10 for s in range(1, 51)]
    for s in steps:
        write_ckpt(d, s)
    return steps


# ---- policy ---------------------------------------------------------------------------

def test_keep_last_one_is_refused_because_the_newest_may_be_mid_write():
    with pytest.raises(ValueError, match="being written"):
        plan_prune([1, 2, 3], [1, 2, 3], keep_last=1, keep_every=None, protect=set())
    with pytest.raises(ValueError):
        prune_dir(Path("/nonexistent"), keep_last=0)


def test_plan_keeps_last_n_milestones_and_protected_with_reasons():
    complete = list(range(100, 1100, 100))
    plan = plan_prune(complete, complete, keep_last=3, keep_every=500, protect={200})
    assert plan.delete == [100, 300, 400, 600, 700]
    assert plan.keep[1000] == (retention.NEWEST, retention.LAST_N, retention.MILESTONE)
    assert plan.keep[800] == (retention.LAST_N,)
    assert plan.keep[500] == (retention.MILESTONE,)
    assert plan.keep[200] == (retention.PROTECTED,)


def test_plan_never_touches_incomplete_steps_newer_than_the_newest_complete():
    plan = plan_prune([10, 20, 30], [10, 20, 30, 40, 50], keep_last=2, protect=set(), idle={40, 50})
    assert plan.delete == [10] and plan.debris == []
    assert plan.keep[40] == plan.keep[50] == (retention.BEING_WRITTEN,)


def test_plan_with_no_complete_checkpoint_deletes_nothing():
    plan = plan_prune([], [10, 20], keep_last=2, idle={10, 20})
    assert plan.delete == [] and plan.debris == []


def test_plan_keep_last_none_keeps_everything():
    plan = plan_prune([1, 2, 3], [0, 1, 2, 3], keep_last=None, idle={0})
    assert plan.delete == [] and plan.debris == [] and set(plan.keep) == {0, 1, 2, 3}


def test_old_idle_incomplete_steps_are_debris_unless_protected():
    plan = plan_prune([10, 30], [10, 20, 25, 30], keep_last=2, idle={20}, protect=set())
    assert plan.debris == [20]
    assert plan.keep[25] == (retention.RECENT_INCOMPLETE,)
    assert plan_prune([10, 30], [10, 20, 30], keep_last=2, idle={20}, protect={20}).debris == []


# ---- storage ------------------------------------------------------------------------------

def test_fifty_checkpoints_pruned_to_keep_last_and_milestones(tmp_path):
    d = tmp_path / "base_checkpoints" / "d8"
    steps = fifty(d)
    kept = {480, 490, 500} | {100, 200, 300, 400}
    expected_bytes = sum(layout.size_of(d, s) for s in set(steps) - kept)
    result = prune_dir(d, keep_last=3, keep_every=100)
    assert layout.list_steps(d) == sorted(kept)
    assert result.deleted_steps == sorted(set(steps) - kept)
    assert result.freed_bytes == expected_bytes
    assert result.errors == []
    assert all(layout.is_complete(d, s) for s in kept)


def test_real_deletion_frees_the_reported_bytes(tmp_path):
    d = tmp_path / "ck"
    fifty(d)
    before = sum(f.stat().st_size for f in d.iterdir())
    result = prune_dir(d, keep_last=5)
    after = sum(f.stat().st_size for f in d.iterdir())
    assert before - after == result.freed_bytes > 0


def test_dry_run_deletes_nothing_but_reports_the_plan(tmp_path):
    d = tmp_path / "ck"
    fifty(d)
    names = sorted(os.listdir(d))
    result = prune_dir(d, keep_last=3, dry_run=True)
    assert sorted(os.listdir(d)) == names
    assert result.deleted_steps == list(range(10, 480, 10))
    assert result.freed_bytes == sum(layout.size_of(d, s) for s in result.deleted_steps)


def test_torn_checkpoints_are_not_counted_and_the_newest_complete_survives(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 20, 30):
        write_ckpt(d, s)
    write_ckpt(d, 40, meta=None)                  # meta missing: save in progress
    write_ckpt(d, 50, meta='{"step": 5')          # meta truncated
    write_ckpt(d, 60, model=b"")                  # model truncated to nothing
    result = prune_dir(d, keep_last=2)
    assert result.deleted_steps == [10]
    assert layout.list_steps(d) == [20, 30, 40, 50, 60]
    assert layout.latest_complete(d) == 30


def test_a_model_truncated_after_its_meta_is_not_counted_as_complete(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 20, 30):
        write_ckpt(d, s, meta={"step": s, "nanod": {"optim_ranks": 1, "files": {
            f"model_{s:06d}.pt": 100, f"optim_{s:06d}_rank0.pt": 50}}})
    layout.model_path(d, 30).write_bytes(b"m" * 10)  # truncated after the fact
    result = prune_dir(d, keep_last=2)
    assert result.deleted_steps == []                 # 30 does not count: 10 and 20 are the last two
    assert result.kept[30] == (retention.BEING_WRITTEN,)


def test_save_in_progress_and_hidden_temp_files_are_untouched(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 20, 30, 40):
        write_ckpt(d, s)
    write_ckpt(d, 50, meta=None, mtime=OLD)          # renamed model, no meta yet (even if old)
    tmp = layout.temp_path(layout.meta_path(d, 50))
    tmp.write_text('{"st')
    old_tmp = d / ".model_000010.pt.999.tmp"
    old_tmp.write_bytes(b"x")
    os.utime(old_tmp, (OLD, OLD))
    prune_dir(d, keep_last=2)
    assert layout.list_steps(d) == [30, 40, 50]
    assert tmp.exists() and old_tmp.exists()
    assert layout.model_path(d, 50).exists()


def test_protected_steps_survive(tmp_path):
    d = tmp_path / "ck"
    fifty(d)
    result = prune_dir(d, keep_last=2, protect={120, 250})   # resumed from; final step of a phase
    assert layout.list_steps(d) == [120, 250, 490, 500]
    assert result.kept[120] == (retention.PROTECTED,)


def test_stray_files_are_never_touched(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 20, 30, 40):
        write_ckpt(d, s)
    strays = ["model_000010_backup.pt", "notes.txt", "meta_10.json", "model_000020.pt.bak"]
    for n in strays:
        (d / n).write_text("keep me")
    prune_dir(d, keep_last=2)
    assert all((d / n).exists() for n in strays)
    assert layout.list_steps(d) == [30, 40]


def test_meta_is_deleted_first_then_optimizer_then_model(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 20, 30):
        write_ckpt(d, s, ranks=2)
    order = []

    def recording_unlink(p):
        order.append(Path(p).name)
        os.unlink(p)

    prune_dir(d, keep_last=2, unlink=recording_unlink)
    assert order == ["meta_000010.json", "optim_000010_rank0.pt", "optim_000010_rank1.pt", "model_000010.pt"]


def test_deletion_interrupted_after_the_meta_leaves_nothing_resumable(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 20, 30):
        write_ckpt(d, s)

    def dies_after_meta(p):
        os.unlink(p)
        if Path(p).name.startswith("meta_"):
            raise KeyboardInterrupt  # the process is killed right after the marker went

    with pytest.raises(KeyboardInterrupt):
        prune_dir(d, keep_last=2, unlink=dies_after_meta)
    assert layout.model_path(d, 10).exists()
    assert not layout.is_complete(d, 10)
    assert layout.complete_steps(d) == [20, 30]


def test_deletion_failure_is_reported_not_raised_and_the_checkpoint_stays_whole(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 20, 30, 40):
        write_ckpt(d, s)

    def refuses_step_10(p):
        if "000010" in Path(p).name:
            raise PermissionError(13, "Permission denied")
        os.unlink(p)

    result = prune_dir(d, keep_last=2, unlink=refuses_step_10)
    assert any("meta_000010.json" in e and "Permission denied" in e for e in result.errors)
    assert layout.is_complete(d, 10)           # meta could not go, so the weights stayed
    assert layout.list_steps(d) == [10, 30, 40]


def test_real_permission_failure_is_logged_not_raised(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    d = tmp_path / "ck"
    for s in (10, 20, 30):
        write_ckpt(d, s)
    d.chmod(0o500)
    try:
        result = prune_dir(d, keep_last=2)
    finally:
        d.chmod(0o700)
    assert result.errors and layout.is_complete(d, 10)


def test_old_incomplete_leftover_is_deleted_as_debris_but_a_recent_one_is_not(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 40, 50):
        write_ckpt(d, s)
    write_ckpt(d, 20, meta=None, mtime=OLD)          # crash mid-save an hour+ ago
    write_ckpt(d, 30, meta='{"tor', mtime=time.time())  # torn but touched just now
    result = prune_dir(d, keep_last=2)
    assert result.debris == [20]
    assert result.deleted_steps == [10, 20]
    assert layout.list_steps(d) == [30, 40, 50]
    assert result.kept[30] == (retention.RECENT_INCOMPLETE,)


def test_a_recent_temp_file_keeps_an_old_leftover_alive(tmp_path):
    d = tmp_path / "ck"
    for s in (10, 40, 50):
        write_ckpt(d, s)
    write_ckpt(d, 20, meta=None, mtime=OLD)
    layout.temp_path(layout.meta_path(d, 20)).write_text("{")  # someone is writing step 20 now
    assert prune_dir(d, keep_last=2).debris == []
    assert layout.model_path(d, 20).exists()


def test_nanochat_dir_without_nanod_meta_key_works(tmp_path):
    d = tmp_path / "base_checkpoints" / "d20"
    for s in range(100, 700, 100):
        write_ckpt(d, s, nanod=False)
    prune_dir(d, keep_last=3)
    assert layout.list_steps(d) == [400, 500, 600]


def test_old_nanochat_sft_without_optimizer_needs_optim_ranks_zero(tmp_path):
    d = tmp_path / "chatsft_checkpoints" / "d20"
    for s in (100, 200, 300):
        write_ckpt(d, s, optim=None, nanod=False)
    # without optim_ranks=0 none counts as complete, so nothing may go
    assert prune_dir(d, keep_last=2).deleted_steps == []
    assert prune_dir(d, keep_last=2, optim_ranks=0).deleted_steps == [100]


def test_missing_directory_is_nothing_to_do(tmp_path):
    result = prune_dir(tmp_path / "nope", keep_last=3)
    assert result.deleted_steps == [] and result.errors == []


# ---- nanod prune / nanod checkpoints, as a user runs them ----------------------------------------------

def nanod(home: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root), "NANOD_LOCK_DIR": str(home.parent / "locks")}
    # not `-m daemon.cli`: as __main__ its UserError would be a second class, not the one commands raise
    cli = "import sys; from daemon.cli import main; sys.exit(main())"
    return subprocess.run([PYTHON, "-c", cli, "--home", str(home), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def write_job(home: Path, *, state=JobState.RUNNING, final=None, resumed_from=None, init_from=None,
              phase="mid", keep_last=2) -> None:
    spec = parse_job({"model_tag": "d4", "retention": {"keep_last": keep_last},
                      "phases": [{"phase": "base", "args": {"depth": 4}}, {"phase": "mid"}]}, default_name="tiny")
    rec = JobRecord(name="tiny", seq=1, spec=spec.model_dump(mode="json"), state=state,
                    phase_final_steps=final or {},
                    attempts=[Attempt(n=1, phase=phase, resumed_from=resumed_from, init_from=init_from)])
    (home / "state" / "jobs").mkdir(parents=True, exist_ok=True)
    write_json_atomic(home / "state" / "jobs" / "tiny.json", rec.to_dict())


def test_prune_dry_run_deletes_nothing_and_prints_the_plan(tmp_path):
    root, home = tmp_path / "nanochat", tmp_path / "home"
    base = layout.checkpoint_dir(root, "base", "d4")
    for s in (10, 20, 30, 40):
        write_ckpt(base, s)
    write_job(home, final={"base": 40})
    names = sorted(os.listdir(base))
    r = nanod(home, root, "prune", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(base)) == names
    assert "base_checkpoints/d4 (job tiny): keep_last 2" in r.stdout
    assert "would delete step 10" in r.stdout and "would delete step 20" in r.stdout
    assert "would free" in r.stdout and "step 30" not in r.stdout.replace("kept step 30", "")


def test_prune_protects_final_steps_and_the_checkpoint_being_resumed_from(tmp_path):
    root, home = tmp_path / "nanochat", tmp_path / "home"
    base = layout.checkpoint_dir(root, "base", "d4")
    mid = layout.checkpoint_dir(root, "mid", "d4")
    for s in (10, 20, 30, 40):
        write_ckpt(base, s)
    write_ckpt(base, 50, meta=None)                       # a newer torn one: left alone
    for s in (5, 10, 15, 20, 25):
        write_ckpt(mid, s)
    write_job(home, final={"base": 10}, resumed_from=15, init_from=10)
    expected = sum(layout.size_of(mid, s) for s in (5, 10)) + layout.size_of(base, 20)
    r = nanod(home, root, "prune")
    assert r.returncode == 0, r.stderr
    assert layout.list_steps(base) == [10, 30, 40, 50]
    assert layout.list_steps(mid) == [15, 20, 25]
    assert "kept step 10: final checkpoint of tiny's base phase" in r.stdout
    assert "kept step 15: tiny attempt 1 resumed from it" in r.stdout
    assert f"freed {retention_size(expected)}" in r.stdout


def retention_size(n):
    from daemon.units import format_size
    return format_size(n)


def test_prune_one_job_by_name_and_unknown_name_is_a_user_error(tmp_path):
    root, home = tmp_path / "nanochat", tmp_path / "home"
    write_job(home)
    r = nanod(home, root, "prune", "nope")
    assert r.returncode == 2 and "no job named 'nope'" in r.stderr


def test_prune_without_jobs_needs_an_explicit_dir_and_keep_last(tmp_path):
    root, home = tmp_path / "nanochat", tmp_path / "home"
    d = tmp_path / "somewhere" / "base_checkpoints" / "d20"
    for s in range(100, 600, 100):
        write_ckpt(d, s, nanod=False)
    r = nanod(home, root, "prune")
    assert r.returncode == 2 and "--dir PATH --keep-last N" in r.stderr
    assert nanod(home, root, "prune", "--dir", str(d)).returncode == 2
    r = nanod(home, root, "prune", "--dir", str(d), "--keep-last", "1")
    assert r.returncode == 2 and "at least 2" in r.stderr
    r = nanod(home, root, "prune", "--dir", str(d), "--keep-last", "2", "--keep-every", "200")
    assert r.returncode == 0, r.stderr
    assert layout.list_steps(d) == [200, 400, 500]
    assert "deleted step 100" in r.stdout and "deleted step 300" in r.stdout


def test_checkpoints_lists_completeness_protection_and_what_prune_would_do(tmp_path):
    root, home = tmp_path / "nanochat", tmp_path / "home"
    base = layout.checkpoint_dir(root, "base", "d4")
    for s in (10, 20, 30, 40):
        write_ckpt(base, s)
    write_ckpt(base, 50, meta=None)
    write_job(home, final={"base": 10})
    r = nanod(home, root, "checkpoints")
    assert r.returncode == 0, r.stderr
    lines = {int(l.split()[1]): l for l in r.stdout.splitlines() if l.strip().startswith("step")}
    assert "protected: final checkpoint of tiny's base phase" in lines[10]
    assert "prune would delete" in lines[20]
    assert "kept: newest, last-N" in lines[40]
    assert "INCOMPLETE (meta missing" in lines[50]
    assert nanod(home, root, "checkpoints", "tiny").returncode == 0
    assert len(list(base.iterdir())) == 4 * 3 + 2      # read-only


def test_checkpoints_without_jobs_lists_nanochat_dirs(tmp_path):
    root, home = tmp_path / "nanochat", tmp_path / "home"
    write_ckpt(layout.checkpoint_dir(root, "base", "d20"), 100, nanod=False)
    r = nanod(home, root, "checkpoints")
    assert r.returncode == 0 and "base_checkpoints/d20" in r.stdout and "complete" in r.stdout


# ---- prune_job: the daemon's one entry ------------------------------------------------------------

def job_record(name="tiny", *, tag="d4", keep_last=2, state=JobState.RUNNING, attempts=(), final=None,
               mid_tag=None) -> JobRecord:
    mid = {"phase": "mid", **({"args": {"model_tag": mid_tag}} if mid_tag else {})}
    spec = parse_job({"model_tag": tag, "retention": {"keep_last": keep_last},
                      "phases": [{"phase": "base", "args": {"depth": 4}}, mid]}, default_name=name)
    return JobRecord(name=name, seq=1, spec=spec.model_dump(mode="json"), state=state,
                     phase_final_steps=final or {}, attempts=list(attempts))


def test_prune_job_protects_a_live_attempts_resume_step_but_not_an_ended_ones(tmp_path):
    base = layout.checkpoint_dir(tmp_path, "base", "d4")
    for s in (10, 20, 30, 40):
        write_ckpt(base, s)
    live = job_record(attempts=[Attempt(n=1, phase="base", resumed_from=10)])
    retention.prune_job(tmp_path, [live], "tiny")
    assert layout.list_steps(base) == [10, 30, 40]
    ended = job_record(attempts=[Attempt(n=1, phase="base", resumed_from=10, ended_at=time.time())])
    [(pol, res)] = retention.prune_job(tmp_path, [ended], "tiny", phases=["base"])
    assert res.deleted_steps == [10] and layout.list_steps(base) == [30, 40] and pol.keep_last == 2


def test_prune_job_touches_only_the_phases_asked_and_keeps_what_another_job_needs(tmp_path):
    base, mid = layout.checkpoint_dir(tmp_path, "base", "d4"), layout.checkpoint_dir(tmp_path, "mid", "d4")
    for s in (10, 20, 30, 40):
        write_ckpt(base, s)
        write_ckpt(mid, s)
    other = job_record("other", final={"base": 10})      # finished with base's final at 10, same folder
    retention.prune_job(tmp_path, [job_record(), other], "tiny", phases=["base"])
    assert layout.list_steps(base) == [10, 30, 40]
    assert layout.list_steps(mid) == [10, 20, 30, 40], "a phase not asked for is left alone"


def test_prune_job_follows_a_phases_own_model_tag(tmp_path):
    mid = layout.checkpoint_dir(tmp_path, "mid", "m2")
    for s in (10, 20, 30):
        write_ckpt(mid, s)
    [(pol, _)] = retention.prune_job(tmp_path, [job_record(mid_tag="m2")], "tiny", phases=["mid"])
    assert pol.path == mid and layout.list_steps(mid) == [20, 30]


def test_prune_job_with_keep_last_unset_deletes_nothing(tmp_path):
    base = layout.checkpoint_dir(tmp_path, "base", "d4")
    for s in (10, 20, 30):
        write_ckpt(base, s)
    rec = job_record()
    rec.spec["retention"]["keep_last"] = None
    assert retention.prune_job(tmp_path, [rec], "tiny") == []
    assert layout.list_steps(base) == [10, 20, 30]


def test_prune_job_reports_a_folder_it_cannot_list_as_an_error_line_never_raises(tmp_path):
    base = layout.checkpoint_dir(tmp_path, "base", "d4")
    base.parent.mkdir(parents=True)
    base.symlink_to(base)   # a symlink loop: listing it fails with ELOOP, even for root
    [(_, res)] = retention.prune_job(tmp_path, [job_record()], "tiny", phases=["base"])
    assert res.errors and str(base) in res.errors[0] and res.deleted_steps == []
