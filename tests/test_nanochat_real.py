"""The real nanochat under the real daemon: the training safety guide's plan, scaled down to a CPU, on the two
commits nanod supports (../shared/nanochat), through kill -9s.

- guide-era (8c89661, the configurator): the guide's plan verbatim is refused at submission, in `nanod check`
  and in the inbox, naming mid's save_every and sft's max_tokens; without the flags no nanochat script has, it
  runs base -> mid -> sft to done through a kill -9 in base (resumed with --resume_from_step) and one in mid
  (restarted from base's final checkpoint), with core_metric_every -1 kept as "off".
- head (92d63d4, argparse): base -> sft with nanod's defaults (its chat_sft compiles with fullgraph=True, so no
  TORCH_COMPILE_DISABLE), through a kill -9 in base.

Skipped with the reason without ../shared/nanochat (NANOCHAT_SRC) or its interpreter (make nanochat-venv).
The first run pays for torch.compile (minutes on 2 cores); the cache in ~/.cache/nanod-tests makes later runs
fast (tests/nanochat_harness.py).
"""
from __future__ import annotations

import pytest
import yaml

from conftest import wait_until
from nanochat_harness import (copy_base, copy_checkout, nanod, needs_interpreter, needs_source, run_env,
                              stable_checkout, start_daemon)  # noqa: F401 (a fixture)
from trainer import layout

NEVER = 1_000_000_000
KEEP_LAST = 2
RECOVERY = {"max_restarts_without_progress": 3, "stall_timeout": "5m", "startup_grace": "10m",  # a cold compile
            "kill_grace": "10s", "backoff_max": "1s", "oom_backoff": True}

# What the guide's plan needs besides its own flags to be minutes on a CPU instead of days: a small batch,
# short evaluations, and at HEAD a model shape the CPU's attention supports well.
SCALE = {
    "guide": {"base": {"total_batch_size": 1024, "eval_tokens": 2048},
              "mid": {"total_batch_size": 1024, "eval_tokens": 2048},
              "sft": {"target_examples_per_step": 4, "eval_steps": 4, "eval_metrics_max_problems": 16}},
    "head": {"base": {"total_batch_size": 1024, "head_dim": 64, "window_pattern": "L", "eval_every": -1},
             "sft": {"eval_tokens": 2048, "chatcore_every": -1}},
}


def guide_plan(repo, era: str, *, verbatim: bool) -> dict:
    """The training safety guide's plan (DESIGN.md's example) at CPU scale: depth 2, 128-token rows, 40 base
    steps saved every 5 (the guide: 3,520 every 250). verbatim=False drops the three flags no nanochat script
    has: mid's save_every, sft's save_every and max_tokens."""
    phases = [("base", {"depth": 2, "device_batch_size": 2, "max_seq_len": 128, "num_iterations": 40,
                        "save_every": 5, "core_metric_every": -1}),
              ("mid", {"device_batch_size": 4, "max_seq_len": 128, "num_iterations": 40, "save_every": 5,
                       "eval_every": -1}),
              ("sft", {"device_batch_size": 2, "max_tokens": 128, "num_iterations": 8 if era == "head" else 6,
                       "save_every": 5, "eval_every": -1})]
    out = []
    for phase, args in phases:
        if phase not in SCALE[era] and not verbatim:
            continue   # HEAD has no mid_train
        if not verbatim:
            args = {k: v for k, v in args.items() if not (phase != "base" and k in ("save_every", "max_tokens"))}
        p = {"phase": phase, "args": {**args, **SCALE[era].get(phase, {})}}
        if phase != "base" and era == "guide":
            p["env"] = {"TORCH_COMPILE_DISABLE": "1"}   # the guide's, as it writes it
        out.append(p)
    return {"model_tag": "d2", "runner": "nanochat", "nanochat": {"repo": str(repo), "python": ".venv/bin/python"},
            "env": {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, "recovery": RECOVERY,
            "retention": {"keep_last": KEEP_LAST}, "phases": out}


def events(rec: dict, kind: str) -> list[str]:
    return [e["message"] for e in rec["events"] if e["kind"] == kind]


def start_plan(tmp_path, start_daemon, era: str):
    """A daemon over the era's runnable checkout and a fresh data dir, the runnable guide plan submitted as
    job `era`, and its first base attempt killed once a checkpoint is complete: (daemon, that step)."""
    repo, base = stable_checkout(era), copy_base(tmp_path / "nc")
    d = start_daemon(repo, env=run_env(base), base=base)
    d.submit(era, yaml.safe_dump(guide_plan(repo, era, verbatim=False)))
    return d, kill_after_first_checkpoint(d, era, 1)


def kill_after_first_checkpoint(d, name: str, n: int) -> int:
    """kill -9 attempt n of base once a checkpoint is complete and before its last; the step it had."""
    att = d.wait_attempt(name, n, timeout=120)
    ckpts = d.nc / "base_checkpoints" / "d2"
    first = wait_until(lambda: layout.latest_complete(ckpts, optim_ranks=1), timeout=600, interval=0.05,
                       message="base's first complete checkpoint")
    d.kill(att)
    assert first < 40, "base finished before it could be killed"
    return first


def kill_after_first_step(d, name: str, n: int) -> None:
    """kill -9 attempt n once its first step line is in its log."""
    att = d.wait_attempt(name, n, timeout=120)
    wait_until(lambda: any(ln.startswith("step ") for ln in d.log(att).splitlines()), timeout=600, interval=0.05,
               message=f"the first step of attempt {n}")
    d.kill(att)


def assert_kill_reasons_are_clean(rec: dict) -> None:
    """A kill -9 names no error: not nanochat's last log line (an INFO line in ANSI colours)."""
    for att in rec["attempts"]:
        if att["outcome"] == "crashed":
            assert att["error"] == ""
    texts = [rec["reason"], *(e["message"] for e in rec["events"]), *(a["error"] for a in rec["attempts"])]
    assert not [t for t in texts if "\x1b" in t or " - INFO - " in t]
    assert all("crashed (killed by signal 9); relaunching in" in m for m in events(rec, "restart"))


def assert_keep_last(d, phases: tuple[str, ...]) -> None:
    """Retention holds after the phase ends too (promise 10): at most keep_last checkpoints per folder."""
    kept = {p: layout.complete_steps(d.nc / layout.PHASE_DIRS[p] / "d2", optim_ranks=0) for p in phases}
    assert all(len(steps) <= KEEP_LAST for steps in kept.values()), kept


@needs_source
@pytest.mark.slow
def test_the_guides_plan_verbatim_is_refused_at_submission_in_check_and_in_the_inbox(tmp_path, start_daemon):
    repo = copy_checkout(tmp_path / "guide", "guide")
    plan = tmp_path / "guide-plan.yaml"
    plan.write_text(yaml.safe_dump({"name": "guide-plan", **guide_plan(repo, "guide", verbatim=True)}))
    d = start_daemon(repo)
    r = nanod(d.home, "submit", str(plan))
    assert r.returncode == 2 and r.stdout == ""
    assert "phases.mid.args.save_every: no such option in scripts/mid_train.py (mid_train saves only at its end: " \
           "drop save_every)" in r.stderr
    assert "phases.sft.args.max_tokens: no such option in scripts/chat_sft.py (chat_sft has no max_tokens; " \
           "HEAD calls it max_seq_len" in r.stderr
    r = nanod(d.home, "check", str(plan))
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert r.returncode == 1 and [f.split(":")[0] for f in fails] == ["FAIL mid flags", "FAIL sft flags"]
    dropped = d.submit("guide-plan", plan.read_text())
    marker = dropped.with_name(dropped.name + ".rejected")
    wait_until(marker.exists, timeout=10, message="the inbox's rejection")
    assert "phases.mid.args.save_every" in marker.read_text() and "phases.sft.args.max_tokens" in marker.read_text()
    assert d.record("guide-plan") == {}
    # at HEAD the same plan is refused for its mid phase, removed from nanochat on 2026-01-31
    head = copy_checkout(tmp_path / "head", "head")
    plan.write_text(yaml.safe_dump({"name": "guide-plan", **guide_plan(head, "head", verbatim=True)}))
    (d.home / "config.toml").write_text(d.config.replace(str(repo), str(head)))
    r = nanod(d.home, "submit", str(plan))
    assert r.returncode == 2 and "has no mid phase (removed 2026-01-31); drop the mid phase" in r.stderr


@needs_interpreter
@pytest.mark.slow
def test_guide_era_runs_the_guides_plan_to_done_through_a_kill_in_base_and_one_in_mid(tmp_path, start_daemon):
    d, killed_at = start_plan(tmp_path, start_daemon, "guide")
    kill_after_first_step(d, "guide", 3)          # attempt 2 resumes base and completes it; 3 is mid's first
    rec = d.wait_state("guide", "done", timeout=900)
    atts = rec["attempts"]
    assert [(a["phase"], a["outcome"]) for a in atts] == [
        ("base", "crashed"), ("base", "completed"), ("mid", "crashed"), ("mid", "completed"), ("sft", "completed")]
    final = rec["phase_final_steps"]
    assert final["base"] == 40 and final["sft"] == 5   # the configurator's chat_sft saves its last step, N-1
    argv = d.argvs("guide")
    # base: the same arguments plus the resume flag, in the configurator's spelling; the script resumed
    assert atts[1]["resumed_from"] >= killed_at and argv[1] == argv[0] + [f"--resume_from_step={atts[1]['resumed_from']}"]
    assert f"Resuming optimization from step {atts[1]['resumed_from']}" in d.log(atts[1])
    # -1 stays where base_train guards it: CORE stays off (offline it has no eval bundle; on a card, no 1-2 GB)
    assert "--core_metric_every=-1" in argv[0] and "CORE metric" not in d.log(atts[1])
    # mid cannot resume: restarted from base's final checkpoint with the identical arguments
    assert [(a["resumed_from"], a["init_from"]) for a in atts[2:4]] == [(None, 40), (None, 40)]
    assert argv[3] == argv[2] and argv[2][-2:] == ["--model_tag=d2", "--step=40"] and f"--eval_every={NEVER}" in argv[2]
    assert events(rec, "restart_from_start") == ["restarted from the start: this nanochat phase cannot resume"]
    assert any(m.startswith("eval_every: -1 turns off the evaluation in scripts/mid_train.py, but its final save "
                            "reads val_bpb") for m in events(rec, "runner_note"))
    assert argv[4][-3:] == ["--model_tag=d2", "--source=mid", f"--step={final['mid']}"]
    assert layout.is_complete(d.nc / "chatsft_checkpoints/d2", 5, optim_ranks=0)
    assert_kill_reasons_are_clean(rec)
    assert_keep_last(d, ("base", "mid", "sft"))


@needs_interpreter
@pytest.mark.slow
def test_head_runs_base_then_sft_to_done_with_nanods_defaults_through_a_kill_in_base(tmp_path, start_daemon):
    d, killed_at = start_plan(tmp_path, start_daemon, "head")
    rec = d.wait_state("head", "done", timeout=900)
    atts = rec["attempts"]
    assert [(a["phase"], a["outcome"]) for a in atts] == [("base", "crashed"), ("base", "completed"),
                                                          ("sft", "completed")]
    argv = d.argvs("head")
    assert atts[1]["resumed_from"] >= killed_at and argv[1] == argv[0] + [f"--resume-from-step={atts[1]['resumed_from']}"]
    assert {"--core-metric-every=-1", "--eval-every=-1"} <= set(argv[0])   # guarded at HEAD: passed as written
    assert argv[2][-2:] == ["--model-tag=d2", "--model-step=40"]
    # nanod's guide default TORCH_COMPILE_DISABLE=1 would fail HEAD's chat_sft at its first step: not set
    assert any(m.startswith("TORCH_COMPILE_DISABLE not set for sft") for m in events(rec, "runner_note"))
    sft_final = rec["phase_final_steps"]["sft"]
    assert layout.is_complete(d.nc / "chatsft_checkpoints/d2", sft_final, optim_ranks=1)
    assert_kill_reasons_are_clean(rec)
    assert_keep_last(d, ("base", "sft"))
