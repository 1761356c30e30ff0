"""The nanochat runner: argv in both flag styles, step lines, exit classes, completeness,
the operator's allow-list, and the stand-in checkout behaving like nanochat where nanod looks.

The end-to-end tests with the real daemon are in the last section.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_until
from daemon.config import load_settings
from daemon.trainers import Outcome
from daemon.trainers.nanochat import (NEVER, NanochatTrainer, NanochatRefused, check_job, classify_exit,
                                     parse_step_line, read_script)
from daemon.spec import parse_job
from nanochat_standin import make_checkout
from trainer import layout

STANDIN_FAST = {"STANDIN_STEP_SECONDS": "0.005"}


# ---- fixtures -------------------------------------------------------------------------

@pytest.fixture
def dash(tmp_path) -> Path:
    return make_checkout(tmp_path / "nanochat-dash", "dash")


@pytest.fixture
def underscore(tmp_path) -> Path:
    return make_checkout(tmp_path / "nanochat-old", "underscore")


def settings_for(tmp_path, *repos, **over):
    return load_settings(home=tmp_path / "home", nanochat_base_dir=tmp_path / "nc",
                         nanochat_repos=[str(r) for r in repos], **over)


def job(repo: Path, phases: list[dict], **top) -> object:
    data = {"name": "nc", "model_tag": "d4", "runner": "nanochat",
            "nanochat": {"repo": str(repo), "python": ".venv/bin/python", **top.pop("nanochat", {})},
            "phases": phases, **top}
    return parse_job(data, default_name="nc")


BASE = {"phase": "base", "args": {"depth": 4, "max_seq_len": 64, "device_batch_size": 4, "num_iterations": 12,
                                  "save_every": 4, "eval_every": -1, "core_metric_every": -1}}
SFT = {"phase": "sft", "args": {"device_batch_size": 2, "num_iterations": 5, "eval_every": -1}}
MID = {"phase": "mid", "args": {"device_batch_size": 4, "max_seq_len": 64, "total_batch_size": 1024,
                                "num_iterations": 6, "eval_every": -1}}
U_BASE = {"phase": "base", "args": {**BASE["args"], "total_batch_size": 1024, "sample_every": -1}}
U_SFT = {"phase": "sft", "args": {"device_batch_size": 2, "num_iterations": 5, "eval_every": -1}}


def adapter_for(tmp_path, spec, repo) -> NanochatTrainer:
    return NanochatTrainer(settings_for(tmp_path, repo)).for_job(spec)


def launch(tmp_path, spec, repo, index=0, *, args=None, resume_from=None, init_from=None):
    ad = adapter_for(tmp_path, spec, repo)
    return ad.build_launch(spec, index, args=dict(args if args is not None else spec.phases[index].args),
                           resume_from=resume_from, init_from=init_from)


def write_checkpoint(ckpt_dir: Path, step: int, *, ranks: int = 1, meta: dict | None = None) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    layout.model_path(ckpt_dir, step).write_bytes(b"model")
    layout.meta_path(ckpt_dir, step).write_text(json.dumps(meta if meta is not None else {"step": step}))
    for r in range(ranks):
        layout.optim_path(ckpt_dir, step, r).write_bytes(b"optim")


# ---- reading a checkout ---------------------------------------------------------------

def test_dash_checkout_is_read_as_argparse_with_dashes_and_resume_in_base_only(dash):
    base, sft = read_script(dash / "scripts/base_train.py"), read_script(dash / "scripts/chat_sft.py")
    assert (base.configurator, base.flag_style, base.can_resume) == (False, "dash", True)
    assert "fp8" in base.store_true and "device_batch_size" in base.options
    assert (sft.can_resume, sft.optim_saving, "model_step" in sft.options) == (False, "all", True)


def test_underscore_checkout_is_read_as_configurator(underscore):
    base = read_script(underscore / "scripts/base_train.py")
    mid = read_script(underscore / "scripts/mid_train.py")
    sft = read_script(underscore / "scripts/chat_sft.py")
    assert (base.configurator, base.flag_style, base.can_resume) == (True, "underscore", True)
    assert (mid.can_resume, mid.optim_saving) == (False, "rank0")   # saved on the master process only
    assert (sft.can_resume, sft.optim_saving) == (False, "none")    # no optimizer file at all
    assert {"source", "step"} <= sft.options


def test_argparse_with_underscores_is_underscore_style(tmp_path):
    # nanochat between 2026-01-04 and 2026-01-13: argparse, but --device_batch_size
    script = tmp_path / "base_train.py"
    script.write_text('parser.add_argument("--device_batch_size", type=int, default=32)\n'
                      'parser.add_argument("--resume_from_step", type=int, default=-1)\n')
    s = read_script(script)
    assert (s.configurator, s.flag_style, s.can_resume) == (False, "underscore", True)


def test_save_call_tells_which_optimizer_files_a_checkpoint_has(tmp_path):
    script = tmp_path / "x.py"
    cases = {"none": "save_checkpoint(d, step, model.state_dict(), None, # no optimizer\n {'a': (1, 2)})",
             "rank0": "save_checkpoint(d, step, m.state_dict(), [o.state_dict() for o in opts], {})",
             "all": "save_checkpoint(\n d,\n step,\n m,\n opt.state_dict(),\n {'k': f(1, 2)},\n rank=ddp_rank,\n)"}
    for expected, call in cases.items():
        script.write_text("from nanochat.checkpoint_manager import save_checkpoint\n" + call + "\n")
        assert read_script(script).optim_saving == expected, call


# ---- argv -----------------------------------------------------------------------------

def test_dash_argv_runs_the_phase_module_from_the_checkout_with_its_interpreter(tmp_path, dash):
    spec = job(dash, [BASE])
    ln = launch(tmp_path, spec, dash)
    assert ln.argv[:3] == [str(dash / ".venv/bin/python"), "-m", "scripts.base_train"]
    assert ln.argv[3:] == ["--depth=4", "--max-seq-len=64", "--device-batch-size=4", "--num-iterations=12",
                           "--save-every=4", "--eval-every=-1", "--core-metric-every=-1", "--model-tag=d4"]
    assert ln.cwd == dash and ln.env["PYTHONUNBUFFERED"] == "1"
    assert ln.env["NANOCHAT_BASE_DIR"] == str(tmp_path / "nc") and ln.notes == ()


def test_underscore_argv_turns_minus_one_into_never_and_says_so(tmp_path, underscore):
    spec = job(underscore, [U_BASE])
    ln = launch(tmp_path, spec, underscore)
    assert f"--eval_every={NEVER}" in ln.argv and f"--sample_every={NEVER}" in ln.argv
    assert f"--core_metric_every={NEVER}" in ln.argv and "--device_batch_size=4" in ln.argv
    assert "--save_every=4" in ln.argv and "--model_tag=d4" in ln.argv
    assert len(ln.notes) == 3 and all("every step" in n for n in ln.notes)


def test_minus_one_is_kept_where_argparse_means_disabled(tmp_path, dash):
    ln = launch(tmp_path, job(dash, [BASE]), dash)
    assert "--eval-every=-1" in ln.argv


def test_job_flag_style_overrides_detection(tmp_path, dash):
    spec = job(dash, [BASE], nanochat={"flag_style": "underscore"})
    assert "--device_batch_size=4" in launch(tmp_path, spec, dash).argv


def test_values_are_spelled_the_way_each_parser_reads_them(tmp_path, dash, underscore):
    args = {**BASE["args"], "fp8": True, "matrix_lr": 1.0}
    ln = launch(tmp_path, job(dash, [{"phase": "base", "args": args}]), dash)
    assert "--fp8" in ln.argv and "--matrix-lr=1.0" in ln.argv
    ln = launch(tmp_path, job(dash, [{"phase": "base", "args": {**args, "fp8": False}}]), dash)
    assert not any(a.startswith("--fp8") for a in ln.argv)
    uargs = {**U_BASE["args"], "matrix_lr": 1.0, "run": "a=b"}
    with pytest.raises(NanochatRefused, match="'='"):
        launch(tmp_path, job(underscore, [{"phase": "base", "args": uargs}]), underscore)


def test_resume_repeats_the_arguments_and_pins_the_total_batch_from_the_meta(tmp_path, dash):
    spec = job(dash, [BASE])
    first = launch(tmp_path, spec, dash)
    write_checkpoint(tmp_path / "nc/base_checkpoints/d4", 8, meta={"step": 8, "total_batch_size": 1024,
                                                                   "user_config": {"total_batch_size": -1}})
    again = launch(tmp_path, spec, dash, args={**BASE["args"], "device_batch_size": 2}, resume_from=8)
    expected = [a if a != "--device-batch-size=4" else "--device-batch-size=2" for a in first.argv]
    assert again.argv == expected + ["--total-batch-size=1024", "--resume-from-step=8"]


def test_resume_pins_the_configurators_total_batch_from_user_config(tmp_path, underscore):
    spec = job(underscore, [{"phase": "base", "args": {k: v for k, v in U_BASE["args"].items()
                                                        if k != "total_batch_size"}}])
    write_checkpoint(tmp_path / "nc/base_checkpoints/d4", 4, meta={"step": 4, "user_config": {"total_batch_size": 2048}})
    ln = launch(tmp_path, spec, underscore, resume_from=4)
    assert ln.argv[-2:] == ["--total_batch_size=2048", "--resume_from_step=4"]


def test_resume_keeps_an_explicit_total_batch(tmp_path, underscore):
    spec = job(underscore, [U_BASE])
    write_checkpoint(tmp_path / "nc/base_checkpoints/d4", 4, meta={"step": 4, "user_config": {"total_batch_size": 9}})
    ln = launch(tmp_path, spec, underscore, resume_from=4)
    assert ln.argv.count("--total_batch_size=1024") == 1 and ln.argv[-1] == "--resume_from_step=4"


def test_phase_that_cannot_resume_refuses_a_resume_step(tmp_path, dash):
    spec = job(dash, [BASE, SFT])
    ad = adapter_for(tmp_path, spec, dash)
    assert ad.can_resume("base") and not ad.can_resume("sft")
    with pytest.raises(NanochatRefused, match="cannot resume"):
        ad.build_launch(spec, 1, args=SFT["args"], resume_from=3, init_from=12)


def test_sft_names_its_input_checkpoint_instead_of_trusting_the_newest_model_file(tmp_path, dash, underscore):
    ln = launch(tmp_path, job(dash, [BASE, SFT]), dash, 1, init_from=12)
    assert ln.argv[2] == "scripts.chat_sft" and ln.argv[-2:] == ["--model-tag=d4", "--model-step=12"]
    ln = launch(tmp_path, job(underscore, [U_BASE, MID, U_SFT]), underscore, 2, init_from=6)
    assert ln.argv[-3:] == ["--model_tag=d4", "--source=mid", "--step=6"]
    ln = launch(tmp_path, job(underscore, [U_BASE, U_SFT]), underscore, 1, init_from=12)
    assert "--source=base" in ln.argv and "--step=12" in ln.argv


def test_one_phase_sft_starts_from_the_newest_complete_checkpoint_not_a_torn_one(tmp_path, dash):
    d = tmp_path / "nc/base_checkpoints/d4"
    write_checkpoint(d, 8)
    write_checkpoint(d, 12, ranks=0)                     # torn: its optimizer file never came
    ln = launch(tmp_path, job(dash, [SFT]), dash)
    assert ln.argv[-2:] == ["--model-tag=d4", "--model-step=8"]


def test_a_two_gpu_job_is_one_process_command_that_the_launcher_runs_through_torchrun(tmp_path, dash):
    spec = job(dash, [BASE], gpus=[0, 1])
    ln = launch(tmp_path, spec, dash)
    assert ln.argv[:3] == [str(dash / ".venv/bin/python"), "-m", "scripts.base_train"]  # torchrun: tests/test_gpus.py


def test_mid_on_a_checkout_without_mid_is_refused_clearly(tmp_path, dash):
    spec = job(dash, [BASE, MID])
    with pytest.raises(NanochatRefused, match=r"has no mid phase \(removed 2026-01-31\); drop the mid phase"):
        check_job(spec, settings_for(tmp_path, dash))


# ---- progress and exits ---------------------------------------------------------------

@pytest.mark.parametrize("line, step, total, loss", [
    ("step 00250/03520 (7.10%) | loss: 3.123456 | lrm: 1.00 | dt: 812.00ms | tok/sec: 12,345 | bf16_mfu: 41.20 | "
     "epoch: 0 pq: 3 rg: 12 | total time: 3.40m | eta: 41.2m", 251, 3520, 3.123456),
    ("step 00250/03520 (7.10%) | loss: 3.123456 | lrm: 1.00 | dt: 812.00ms | tok/sec: 12,345 | mfu: 41.20 | "
     "total time: 3.40m", 251, 3520, 3.123456),
    ("step 00012 (3.00%) | loss: 1.500000 | lrm: 1.00 | dt: 50.00ms | tok/sec: 1,000 | mfu: 1.00 | epoch: 0 | "
     "total time: 0.10m", 12, None, 1.5),
    ("Step 00000/00010 | Training loss: 1.234567| lrm: 1.000000| num_tokens: 2,048", 1, 10, 1.234567),
    ("\x1b[32mstep 00001/00010 (10.00%) | loss: 2.000000 | dt: 1.00ms | tok/sec: 5 | mfu: 1.00\x1b[0m", 2, 10, 2.0),
    ("step 00001/00010 (10.00%) | loss: 9.0\rstep 00002/00010 (20.00%) | loss: 8.000000 | dt: 2.50ms", 3, 10, 8.0),
])
def test_step_lines_of_every_era_are_progress(line, step, total, loss):
    p = parse_step_line(line)
    assert (p.step, p.total, p.loss) == (step, total, loss)


def test_step_line_fields_are_read():
    p = parse_step_line("step 00250/03520 (7.10%) | loss: 3.1 | lrm: 1.00 | dt: 812.00ms | tok/sec: 12,345 | bf16_mfu: 4")
    assert (p.dt_ms, p.tok_per_sec) == (812.0, 12345.0)


@pytest.mark.parametrize("line", ["Step 00003 | Validation loss: 1.132075", "Step 00250 | Validation bpb: 0.9",
                                  "Saved model parameters to: /x/model_000250.pt", "", "stepping up",
                                  "2026-01-01 - nanochat - \x1b[32mINFO\x1b[0m - step 3"])
def test_other_lines_are_not_progress(line):
    assert parse_step_line(line) is None


@pytest.mark.parametrize("text", ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                                  "RuntimeError: CUDA out of memory.", "RuntimeError: CUDA driver error: out of memory",
                                  "torch.cuda.OutOfMemoryError: boom", "\x1b[31mtorch.OutOfMemoryError\x1b[0m"])
def test_oom_texts_in_the_tail_are_oom(text):
    assert classify_exit(1, f"Traceback (most recent call last):\n  File x\n{text}\n") == Outcome.OOM


def test_exit_classes():
    assert classify_exit(0, "torch.OutOfMemoryError") == Outcome.COMPLETED
    assert classify_exit(1, "RuntimeError: boom") == Outcome.CRASHED
    assert classify_exit(-9, "") == Outcome.CRASHED
    assert classify_exit(2, "usage: base_train.py [-h]\nbase_train.py: error: unrecognized arguments: --x=1\n") \
        == Outcome.BAD_ARGS
    assert classify_exit(1, "ValueError: Unknown config key: save_every") == Outcome.BAD_ARGS
    assert classify_exit(2, "some other failure") == Outcome.CRASHED


# ---- completeness ---------------------------------------------------------------------

def test_checkpoint_missing_a_ranks_optimizer_is_incomplete(tmp_path, dash):
    ad = adapter_for(tmp_path, job(dash, [BASE], gpus=[0, 1]), dash)
    d = tmp_path / "nc/base_checkpoints/d4"
    write_checkpoint(d, 4, ranks=1)
    assert ad.optim_ranks("base") == 2 and not ad.is_complete(d, 4)
    layout.optim_path(d, 4, 1).write_bytes(b"x")
    assert ad.is_complete(d, 4)
    layout.meta_path(d, 4).write_text('{"step": 4, "user_con')  # torn meta
    assert not ad.is_complete(d, 4)


def test_configurator_sft_checkpoint_is_complete_without_optimizer_files(tmp_path, underscore):
    ad = adapter_for(tmp_path, job(underscore, [U_BASE, MID, U_SFT], gpus=[0, 1], nanochat={"nproc_per_node": 2}),
                     underscore)
    assert (ad.optim_ranks("base"), ad.optim_ranks("mid"), ad.optim_ranks("sft")) == (2, 1, 0)
    assert NanochatTrainer(None, ad.spec).optim_ranks("sft") == 0   # as retention asks, without settings
    d = tmp_path / "nc/chatsft_checkpoints/d4"
    write_checkpoint(d, 4, ranks=0)
    assert ad.is_complete(d, 4) and ad.latest_complete(d) == 4


# ---- the operator's allow-list (promise 12) ---------------------------------------------

def test_checkout_not_in_the_operators_list_is_refused(tmp_path, dash):
    spec = job(dash, [BASE])
    with pytest.raises(NanochatRefused, match="not in the operator's nanochat_repos"):
        check_job(spec, settings_for(tmp_path))
    check_job(spec, settings_for(tmp_path, dash))
    check_job(spec, settings_for(tmp_path, allow_job_commands=True))
    with pytest.raises(NanochatRefused, match="nanochat_repos"):
        launch(tmp_path, spec, tmp_path / "elsewhere")


def test_listed_checkout_matches_through_symlinks(tmp_path, dash):
    link = tmp_path / "link"
    link.symlink_to(dash)
    check_job(job(link, [BASE]), settings_for(tmp_path, dash))


@pytest.mark.parametrize("python, why", [("/bin/sh", "outside the checkout"), ("nope/python", "not an executable"),
                                         ("scripts/base_train.py", "not an executable")])
def test_interpreter_must_be_an_executable_in_the_checkout(tmp_path, dash, python, why):
    with pytest.raises(NanochatRefused, match=why):
        check_job(job(dash, [BASE], nanochat={"python": python}), settings_for(tmp_path, dash))


def test_plain_python_on_path_is_allowed_and_anything_with_allow_job_commands(tmp_path, dash):
    check_job(job(dash, [BASE], nanochat={"python": "python3"}), settings_for(tmp_path, dash))
    check_job(job(dash, [BASE], nanochat={"python": "/bin/sh"}), settings_for(tmp_path, allow_job_commands=True))


def test_job_env_that_would_run_other_code_is_refused(tmp_path, dash):
    for env in ({"LD_PRELOAD": "/tmp/x.so"}, {"PYTHONPATH": "/tmp"}):
        with pytest.raises(NanochatRefused, match="would run code"):
            check_job(job(dash, [BASE], env=env), settings_for(tmp_path, dash))
    with pytest.raises(NanochatRefused, match="nanochat_base_dir"):
        check_job(job(dash, [BASE], env={"NANOCHAT_BASE_DIR": "/x"}), settings_for(tmp_path, dash))


def test_resumable_phase_must_name_its_iteration_count(tmp_path, dash):
    args = {k: v for k, v in BASE["args"].items() if k != "num_iterations"}
    with pytest.raises(NanochatRefused, match="num_iterations is required"):
        check_job(job(dash, [{"phase": "base", "args": args}]), settings_for(tmp_path, dash))
    check_job(job(dash, [BASE, {"phase": "sft", "args": {}}]), settings_for(tmp_path, dash))


def test_nanods_own_arguments_are_refused_in_args(tmp_path, dash):
    with pytest.raises(NanochatRefused, match="model_tag is nanod's to set"):
        check_job(job(dash, [{"phase": "base", "args": {**BASE["args"], "model_tag": "x"}}]),
                  settings_for(tmp_path, dash))


# ---- the stand-in, driven through the adapter's launches -------------------------------

def run_launch(ln, log: Path, extra_env: dict | None = None, *, unbuffered=True) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
    env.update(ln.env)
    env.update(STANDIN_FAST)
    env.update(extra_env or {})
    if not unbuffered:
        env.pop("PYTHONUNBUFFERED", None)
    with open(log, "ab") as f:
        return subprocess.Popen(ln.argv, cwd=ln.cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def progress_in(log: Path, ad: NanochatTrainer) -> list:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [p for p in map(ad.parse_progress, text.splitlines()) if p]


def test_standin_stdout_is_block_buffered_without_pythonunbuffered(tmp_path, dash):
    spec = job(dash, [BASE])
    ln = launch(tmp_path, spec, dash)
    ad = adapter_for(tmp_path, spec, dash)
    logs = {}
    for unbuffered in (False, True):
        log = logs[unbuffered] = tmp_path / f"attempt-{unbuffered}.log"
        proc = run_launch(ln, log, {"STANDIN_HANG_AT_STEP": "6"}, unbuffered=unbuffered)
        try:
            wait_until(lambda: layout.is_complete(tmp_path / "nc/base_checkpoints/d4", 4) and
                       "Saved optimizer" in log.read_text(), timeout=20)
            if unbuffered:
                wait_until(lambda: len(progress_in(log, ad)) >= 6, timeout=10)
            else:
                time.sleep(0.5)
                assert progress_in(log, ad) == []  # the steps are done, but sit in the pipe's buffer
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_standin_kill_during_save_then_resume_from_newest_complete(tmp_path, dash):
    """A mini supervisor: kill -9 mid-save, choose with is_complete, relaunch with the resume flag."""
    spec = job(dash, [BASE, SFT])
    ad = adapter_for(tmp_path, spec, dash)
    ckpts = tmp_path / "nc/base_checkpoints/d4"
    log = tmp_path / "a1.log"
    first = ad.build_launch(spec, 0, args=BASE["args"], resume_from=None, init_from=None)
    proc = run_launch(first, log, {"STANDIN_SAVE_SECONDS": "0.3"})
    wait_until(lambda: layout.model_path(ckpts, 8).exists(), timeout=20)   # the save of step 8 has begun
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert layout.model_path(ckpts, 8).exists() and not ad.is_complete(ckpts, 8)
    resume = ad.latest_complete(ckpts)
    assert resume == 4
    again = ad.build_launch(spec, 0, args=BASE["args"], resume_from=resume, init_from=None)
    assert again.argv == first.argv + ["--total-batch-size=1024", "--resume-from-step=4"]
    proc = run_launch(again, tmp_path / "a2.log")
    assert proc.wait(timeout=30) == 0
    assert ad.latest_complete(ckpts) == 12 and ad.classify_exit(0, "") == Outcome.COMPLETED
    sft = ad.build_launch(spec, 1, args=SFT["args"], resume_from=None, init_from=12)
    proc = run_launch(sft, tmp_path / "a3.log")
    assert proc.wait(timeout=30) == 0
    assert ad.latest_complete(tmp_path / "nc/chatsft_checkpoints/d4") == 5
    assert "Loading model from" in (tmp_path / "a3.log").read_text() and "with step 12" in (tmp_path / "a3.log").read_text()


def test_standin_resume_from_a_torn_checkpoint_fails_like_torch_load(tmp_path, dash):
    spec = job(dash, [BASE])
    ckpts = tmp_path / "nc/base_checkpoints/d4"
    write_checkpoint(ckpts, 4, meta={"step": 4, "loop_state": {}, "total_batch_size": 1024})  # model is 5 bytes: torn
    ln = launch(tmp_path, spec, dash, resume_from=4)
    log = tmp_path / "a.log"
    assert run_launch(ln, log).wait(timeout=30) == 1
    assert "PytorchStreamReader failed" in log.read_text()


def test_standin_oom_is_classified_oom_and_halving_fits(tmp_path, dash):
    spec = job(dash, [BASE])
    ad = adapter_for(tmp_path, spec, dash)
    log = tmp_path / "a.log"
    code = run_launch(ad.build_launch(spec, 0, args=BASE["args"], resume_from=None, init_from=None), log,
                      {"STANDIN_OOM_ABOVE": "2"}).wait(timeout=30)
    assert code == 1 and ad.classify_exit(code, log.read_text()[-8192:]) == Outcome.OOM
    ln = ad.build_launch(spec, 0, args={**BASE["args"], "device_batch_size": 2}, resume_from=None, init_from=None)
    assert run_launch(ln, tmp_path / "b.log", {"STANDIN_OOM_ABOVE": "2"}).wait(timeout=30) == 0


def test_standin_refuses_an_unknown_argument_as_bad_args(tmp_path, dash, underscore):
    for repo, bad in ((dash, "--nope=1"), (underscore, "--nope=1")):
        spec = job(repo, [U_BASE if repo == underscore else BASE])
        ad = adapter_for(tmp_path, spec, repo)
        ln = ad.build_launch(spec, 0, args=spec.phases[0].args, resume_from=None, init_from=None)
        ln = type(ln)(argv=ln.argv + [bad], env=ln.env, cwd=ln.cwd)
        log = tmp_path / f"{repo.name}.log"
        code = run_launch(ln, log).wait(timeout=30)
        assert ad.classify_exit(code, log.read_text()) == Outcome.BAD_ARGS


def test_standin_underscore_plan_with_mid_runs_through_the_adapter(tmp_path, underscore):
    spec = job(underscore, [U_BASE, MID, U_SFT])
    ad = adapter_for(tmp_path, spec, underscore)
    steps = {}
    for i, phase in enumerate(("base", "mid", "sft")):
        prev = steps.get(spec.phases[i - 1].phase) if i else None
        ln = ad.build_launch(spec, i, args=spec.phases[i].args, resume_from=None, init_from=prev)
        log = tmp_path / f"{phase}.log"
        assert run_launch(ln, log).wait(timeout=30) == 0, log.read_text()[-2000:]
        steps[phase] = ad.latest_complete(tmp_path / "nc" / layout.PHASE_DIRS[phase] / "d4")
        # -1 would have meant an evaluation at every step in this era; now only at step 0 and the last
        assert sum("Validation" in line for line in log.read_text().splitlines()) <= 2
    assert steps == {"base": 12, "mid": 6, "sft": 4}  # the configurator's chat_sft saves at N-1
    assert progress_in(tmp_path / "sft.log", ad)[-1].step == 4


# ---- end to end: the real daemon over the stand-in ------------------------------------

class Daemon:
    """`nanod run` in a temporary home, its inbox, and its job records."""

    def __init__(self, tmp_path: Path, repo: Path, env: dict[str, str]):
        self.home, self.nc = tmp_path / "home", tmp_path / "nc"
        (self.home / "jobs").mkdir(parents=True, mode=0o700)
        os.chmod(self.home, 0o700)
        (self.home / "config.toml").write_text(
            f'nanochat_repos = ["{repo}"]\nnanochat_base_dir = "{self.nc}"\nlock_dir = "{tmp_path / "locks"}"\n'
            'tick_interval = "0.1s"\n')
        full = {k: v for k, v in os.environ.items() if not k.startswith(("NANOD_", "STANDIN_"))}
        full.update({"STANDIN_STEP_SECONDS": "0.02", **env})
        self.out = open(tmp_path / "daemon.out", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--home", str(self.home), "run"],
                                     cwd=Path(__file__).resolve().parents[1], env=full, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def submit(self, name: str, text: str) -> None:
        tmp = self.home / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.home / "jobs" / f"{name}.yaml")

    def record(self, name: str) -> dict:
        try:
            return json.loads((self.home / "state/jobs" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_state(self, name: str, state: str, timeout: float = 60) -> dict:
        def reached():
            rec = self.record(name)
            if rec.get("state") in ("failed", "cancelled") and state != rec.get("state"):
                pytest.fail(f"job {name} {rec['state']}: {rec.get('reason')}")
            return rec if rec.get("state") == state else None
        return wait_until(reached, timeout=timeout, message=f"job {name} {state}")

    def argvs(self, name: str) -> list[list[str]]:
        """What each attempt's process received, as the stand-in printed it."""
        out = []
        for att in self.record(name)["attempts"]:
            text = (self.home / att["log"]).read_text(errors="replace")
            line = next(ln for ln in text.splitlines() if ln.startswith("standin["))
            out.append(json.loads(line.split(" argv: ", 1)[1]))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for path in (self.home / "state/jobs").glob("*.json"):  # nothing of ours may outlive the test
            for att in json.loads(path.read_text()).get("attempts", []):
                if att.get("pgid") and att.get("ended_at") is None:
                    try:
                        os.killpg(att["pgid"], signal.SIGKILL)
                    except OSError:
                        pass
        self.out.close()


@pytest.fixture
def start_daemon(tmp_path):
    daemons = []

    def start(repo: Path, **env) -> Daemon:
        d = Daemon(tmp_path, repo, env)
        daemons.append(d)
        return d
    yield start
    for d in daemons:
        d.stop()


def plan_yaml(repo: Path, phases: list[dict], **top) -> str:
    import yaml
    data = {"model_tag": "d4", "runner": "nanochat", "nanochat": {"repo": str(repo), "python": ".venv/bin/python"},
            "recovery": {"stall_timeout": "30s", "startup_grace": "30s", "kill_grace": "5s", "backoff_max": "1s"},
            "phases": phases, **top}
    return yaml.safe_dump(data, sort_keys=False)


def kill_attempt(d: Daemon, name: str) -> None:
    att = d.record(name)["attempts"][-1]
    os.killpg(att["pgid"], signal.SIGKILL)


slow = pytest.mark.slow  # the daemon, real processes, real signals


@slow
def test_e2e_dash_plan_runs_base_then_sft_from_base_final(start_daemon, dash):
    d = start_daemon(dash)
    d.submit("nc", plan_yaml(dash, [BASE, SFT]))
    rec = d.wait_state("nc", "done")
    assert rec["phase_final_steps"] == {"base": 12, "sft": 5}
    assert [a["outcome"] for a in rec["attempts"]] == ["completed", "completed"]
    base, sft = d.argvs("nc")
    assert "--model-tag=d4" in base and sft[-2:] == ["--model-tag=d4", "--model-step=12"]
    assert rec["progress"]["step"] == 5 and rec["checkpoint"] == {**rec["checkpoint"], "phase": "sft", "step": 5}


@slow
def test_e2e_kill9_during_and_between_saves_resumes_from_newest_complete_with_identical_args(start_daemon, dash):
    d = start_daemon(dash, STANDIN_STEP_SECONDS="0.15", STANDIN_SAVE_SECONDS="0.4")
    d.submit("nc", plan_yaml(dash, [BASE]))
    ckpts = d.nc / "base_checkpoints/d4"
    # 1. during the save of step 8: its model (maybe its meta) is there, its optimizer file not yet
    wait_until(lambda: layout.model_path(ckpts, 8).exists(), timeout=30)
    assert not layout.optim_path(ckpts, 8).exists()
    kill_attempt(d, "nc")
    wait_until(lambda: len(d.record("nc")["attempts"]) == 2 and d.record("nc")["attempts"][1].get("pid"), timeout=30)
    # 2. between saves: the relaunch has saved step 8 again, whole, and steps on towards 12
    wait_until(lambda: layout.is_complete(ckpts, 8), timeout=30)
    assert not layout.model_path(ckpts, 12).exists()
    kill_attempt(d, "nc")
    rec = d.wait_state("nc", "done")
    first, second, third = d.argvs("nc")
    assert [a["resumed_from"] for a in rec["attempts"]] == [None, 4, 8]
    assert [a["outcome"] for a in rec["attempts"]] == ["crashed", "crashed", "completed"]
    assert second == first + ["--total-batch-size=1024", "--resume-from-step=4"]
    assert third == first + ["--total-batch-size=1024", "--resume-from-step=8"]
    assert rec["phase_final_steps"] == {"base": 12} and layout.is_complete(ckpts, 12)


@slow
def test_e2e_oom_text_halves_device_batch_size_and_keeps_the_other_args(start_daemon, dash):
    d = start_daemon(dash, STANDIN_OOM_ABOVE="2")
    base = {"phase": "base", "args": {**BASE["args"], "device_batch_size": 8}}
    d.submit("nc", plan_yaml(dash, [base, SFT]))
    rec = d.wait_state("nc", "done")
    assert [a["outcome"] for a in rec["attempts"]] == ["oom", "oom", "completed", "completed"]
    assert [a["device_batch_size"] for a in rec["attempts"]] == [8, 4, 2, 2]
    argvs = d.argvs("nc")
    assert [a for a in argvs[0] if "batch" not in a] == [a for a in argvs[2] if "batch" not in a]
    assert "--device-batch-size=2" in argvs[2] and "--device-batch-size=2" in argvs[3]
    assert sum(e["kind"] == "oom_backoff" for e in rec["events"]) == 2


@slow
def test_e2e_underscore_checkout_runs_base_mid_sft_in_its_flag_style(start_daemon, underscore):
    d = start_daemon(underscore)
    d.submit("old", plan_yaml(underscore, [U_BASE, MID, U_SFT]))
    rec = d.wait_state("old", "done")
    base, mid, sft = d.argvs("old")
    assert "--device_batch_size=4" in base and f"--eval_every={NEVER}" in base and f"--sample_every={NEVER}" in base
    assert mid[-2:] == ["--model_tag=d4", "--step=12"]
    assert sft[-3:] == ["--model_tag=d4", "--source=mid", "--step=6"]
    # the configurator's chat_sft writes no optimizer file and saves under step N-1
    assert rec["phase_final_steps"] == {"base": 12, "mid": 6, "sft": 4}
    notes = [e["message"] for e in rec["events"] if e["kind"] == "runner_note"]
    assert any(n.startswith("eval_every: -1 means every step") for n in notes)


@slow
def test_e2e_phase_without_resume_restarts_from_its_input_checkpoint(start_daemon, dash, tmp_path):
    d = start_daemon(dash)
    sft = {**SFT, "env": {"STANDIN_CRASH_AT_STEP": "3", "STANDIN_FAULT_ONCE": str(tmp_path / "crashed-once")}}
    d.submit("nc", plan_yaml(dash, [BASE, sft]))
    rec = d.wait_state("nc", "done")
    atts = rec["attempts"]
    assert [(a["phase"], a["outcome"]) for a in atts] == [("base", "completed"), ("sft", "crashed"),
                                                          ("sft", "completed")]
    assert [(a["resumed_from"], a["init_from"]) for a in atts[1:]] == [(None, 12), (None, 12)]
    _, first, again = d.argvs("nc")
    assert again == first and not any("resume" in a for a in again)
    assert rec["phase_final_steps"]["sft"] == 5


# Promise 12 through the daemon, and the restart of a phase that cannot resume.

@slow
def test_e2e_unlisted_checkout_fails_with_a_one_line_reason_and_never_runs(start_daemon, dash, tmp_path):
    other = make_checkout(tmp_path / "not-listed", "dash")
    d = start_daemon(dash)
    d.submit("evil", plan_yaml(other, [BASE]))
    rec = d.wait_state("evil", "failed", timeout=5)
    assert "not in the operator's nanochat_repos" in rec["reason"] and rec["attempts"] == []


@slow
def test_e2e_restart_of_a_phase_that_cannot_resume_is_said_in_an_event(start_daemon, dash, tmp_path):
    d = start_daemon(dash)
    sft = {**SFT, "env": {"STANDIN_CRASH_AT_STEP": "3", "STANDIN_FAULT_ONCE": str(tmp_path / "crashed-once")}}
    d.submit("nc", plan_yaml(dash, [BASE, sft]))
    rec = d.wait_state("nc", "done")
    assert any(e["message"] == "restarted from the start: this nanochat phase cannot resume" for e in rec["events"])
