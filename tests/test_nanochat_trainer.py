"""The nanochat runner: reading a script's text, argv in both flag styles, what -1 becomes, step lines,
exit classes, completeness, the operator's allow-list and the flag checks before a job is accepted.

The checkouts here are copies of the real nanochat's scripts (read and checked, never run: see
tests/test_nanochat_real.py for the runs), small script texts written by a test, and the
stand-in (tests/nanochat_standin) for what the real scripts cannot show on a CPU: CUDA
out-of-memory texts, several ranks' optimizer files, a kill -9 in the middle of a save.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import wait_until
from daemon.config import load_settings
from daemon.spec import parse_job
from daemon.trainers import Outcome
from daemon.trainers.nanochat import (NEVER, NanochatRefused, NanochatTrainer, check_job, classify_exit,
                                      parse_step_line, read_script)
from daemon.trainers.nanochat_script import EVERY, NEEDS_POSITIVE, OFF, compiles_fullgraph
from nanochat_harness import copy_checkout, missing_source, start_daemon  # noqa: F401 (a fixture)
from nanochat_standin import make_checkout
from trainer import layout

STANDIN_FAST = {"STANDIN_STEP_SECONDS": "0.005"}


# ---- fixtures -------------------------------------------------------------------------

@pytest.fixture
def dash(tmp_path) -> Path:
    return make_checkout(tmp_path / "nanochat-dash")


@pytest.fixture
def guide(tmp_path) -> Path:
    """A copy of the real guide-era checkout (configurator, underscore flags, mid_train), to read and check."""
    if missing_source():
        pytest.skip(missing_source())
    return copy_checkout(tmp_path / "nanochat-guide", "guide")


@pytest.fixture
def head(tmp_path) -> Path:
    """A copy of the real HEAD checkout (argparse, dash flags, no mid), to read and check."""
    if missing_source():
        pytest.skip(missing_source())
    return copy_checkout(tmp_path / "nanochat-head", "head")


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


def script_text(tmp_path, text: str, name: str = "base_train.py"):
    path = tmp_path / name
    path.write_text(text)
    return read_script(path)


# ---- reading a checkout ---------------------------------------------------------------

def test_dash_checkout_is_read_as_argparse_with_dashes_and_resume_in_base_only(dash):
    base, sft = read_script(dash / "scripts/base_train.py"), read_script(dash / "scripts/chat_sft.py")
    assert (base.configurator, base.flag_style, base.can_resume) == (False, "dash", True)
    assert "fp8" in base.store_true and "device_batch_size" in base.options
    assert (sft.can_resume, sft.optim_saving, "model_step" in sft.options) == (False, "all", True)


def test_guide_era_checkout_is_read_as_configurator_with_its_save_points(guide):
    base = read_script(guide / "scripts/base_train.py")
    mid = read_script(guide / "scripts/mid_train.py")
    sft = read_script(guide / "scripts/chat_sft.py")
    assert (base.configurator, base.flag_style, base.can_resume) == (True, "underscore", True)
    assert (mid.can_resume, mid.optim_saving) == (False, "rank0")   # saved on the master process only
    assert (sft.can_resume, sft.optim_saving) == (False, "none")    # no optimizer file at all
    assert {"source", "step"} <= sft.options and "config_keys" not in base.options
    assert "save_every" not in mid.options and not {"max_tokens", "max_seq_len", "save_every"} & sft.options
    assert (base.kinds["matrix_lr"], base.kinds["eval_tokens"], base.kinds["run"]) == ("float", "int", "str")


def test_head_checkout_is_read_with_its_types_choices_and_sft_row_length(head):
    base, sft = read_script(head / "scripts/base_train.py"), read_script(head / "scripts/chat_sft.py")
    assert (base.flag_style, base.can_resume, sft.can_resume, sft.optim_saving) == ("dash", True, False, "all")
    assert base.choices["fp8_recipe"] == ("rowwise", "tensorwise") and base.kinds["fp8"] == "bool"
    assert "max_seq_len" in sft.options and "max_tokens" not in sft.options and "save_every" not in sft.options


def test_what_minus_one_means_is_read_from_each_real_script(head, guide):
    """Where every `step % X` is guarded by X > 0, -1 is off; where one is not, -1 is every step; guide-era
    mid_train guards its evaluation, but its save reads val_bpb, which only the evaluation sets."""
    assert read_script(guide / "scripts/base_train.py").every == {
        "eval_every": EVERY, "sample_every": EVERY, "core_metric_every": OFF, "save_every": OFF}
    mid = read_script(guide / "scripts/mid_train.py")
    assert (mid.every, mid.needs) == ({"eval_every": NEEDS_POSITIVE}, {"eval_every": ("val_bpb",)})
    assert read_script(guide / "scripts/chat_sft.py").every == {"eval_every": EVERY, "eval_metrics_every": EVERY}
    assert set(read_script(head / "scripts/base_train.py").every.values()) == {OFF}
    assert read_script(head / "scripts/chat_sft.py").every == {"eval_every": OFF, "chatcore_every": OFF}


@pytest.mark.parametrize("body, expected", [
    ("if step % eval_every == 0:\n    pass\n", EVERY),
    ("if eval_every > 0 and (last or step % eval_every == 0):\n    pass\n", OFF),
    ("if last or (eval_every > 0 and step % eval_every == 0):\n    pass\n", OFF),
    ("if eval_every > 0:\n    if step % eval_every == 0:\n        pass\n", OFF),
    ("if last or eval_every > 0:\n    x = step % eval_every\n", EVERY),          # `or` guarantees nothing
    ("if eval_every > 0 and step % eval_every == 0:\n    pass\nif step % eval_every == 1:\n    pass\n", EVERY),
])
def test_a_guard_counts_only_where_it_holds(tmp_path, body, expected):
    s = script_text(tmp_path, "eval_every = 250\nexec(open('nanochat/configurator.py').read())\nstep = 0\nlast = 1\n"
                    + body)
    assert s.every == {"eval_every": expected}


def test_a_guarded_evaluation_whose_result_the_save_reads_needs_a_positive_value(tmp_path):
    text = ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--eval-every', type=int)\n"
            "args = p.parse_args()\n"
            "for step in range(3):\n"
            "    if args.eval_every > 0 and step % args.eval_every == 0:\n        bpb = 1.0\n"
            "save_checkpoint('d', step, None, None, {'val_bpb': bpb})\n")
    s = script_text(tmp_path, text)
    assert (s.every, s.needs) == ({"eval_every": NEEDS_POSITIVE}, {"eval_every": ("bpb",)})
    s = script_text(tmp_path, text.replace("for step", "bpb = None\nfor step"))  # set before the loop: fine
    assert s.every == {"eval_every": OFF}


def test_argparse_with_underscores_is_underscore_style(tmp_path):
    # nanochat between 2026-01-04 and 2026-01-13: argparse, but --device_batch_size
    s = script_text(tmp_path, 'parser.add_argument("--device_batch_size", type=int, default=32)\n'
                              'parser.add_argument("--resume_from_step", type=int, default=-1)\n')
    assert (s.configurator, s.flag_style, s.can_resume) == (False, "underscore", True)


def test_save_call_tells_which_optimizer_files_a_checkpoint_has(tmp_path):
    cases = {"none": "save_checkpoint(d, step, model.state_dict(), None, # no optimizer\n {'a': (1, 2)})",
             "rank0": "save_checkpoint(d, step, m.state_dict(), [o.state_dict() for o in opts], {})",
             "all": "save_checkpoint(\n d,\n step,\n m,\n opt.state_dict(),\n {'k': f(1, 2)},\n rank=ddp_rank,\n)"}
    for expected, call in cases.items():
        s = script_text(tmp_path, "from nanochat.checkpoint_manager import save_checkpoint\n" + call + "\n")
        assert s.optim_saving == expected, call


def test_a_script_nanods_python_cannot_parse_is_refused_naming_it(tmp_path):
    with pytest.raises(NanochatRefused, match=r"base_train.py: nanod's Python .* cannot parse it \(line 1"):
        script_text(tmp_path, "def (:\n")


def test_a_checkout_that_compiles_with_fullgraph_is_found(head, guide):
    assert compiles_fullgraph(head, head / "scripts/chat_sft.py") == "nanochat/optim.py"
    assert compiles_fullgraph(guide, guide / "scripts/chat_sft.py") is None


# ---- argv -----------------------------------------------------------------------------

def test_dash_argv_runs_the_phase_module_from_the_checkout_with_its_interpreter(tmp_path, dash):
    spec = job(dash, [BASE])
    ln = launch(tmp_path, spec, dash)
    assert ln.argv[:3] == [str(dash / ".venv/bin/python"), "-m", "scripts.base_train"]
    assert ln.argv[3:] == ["--depth=4", "--max-seq-len=64", "--device-batch-size=4", "--num-iterations=12",
                           "--save-every=4", "--eval-every=-1", "--core-metric-every=-1", "--model-tag=d4"]
    assert ln.cwd == dash and ln.env["PYTHONUNBUFFERED"] == "1"
    assert ln.env["NANOCHAT_BASE_DIR"] == str(tmp_path / "nc") and ln.notes == ()


def test_guide_era_base_turns_unguarded_minus_one_into_never_and_keeps_core_metric_off(tmp_path, guide):
    ln = launch(tmp_path, job(guide, [U_BASE]), guide)
    assert f"--eval_every={NEVER}" in ln.argv and f"--sample_every={NEVER}" in ln.argv
    # CORE runs only when core_metric_every > 0 there: -1 is already off (a big value would run it at the end)
    assert "--core_metric_every=-1" in ln.argv and "--save_every=4" in ln.argv and "--model_tag=d4" in ln.argv
    assert len(ln.notes) == 2 and all("means every step in scripts/base_train.py" in n for n in ln.notes)


def test_guide_era_mid_gets_an_evaluation_at_the_end_because_its_save_needs_it(tmp_path, guide):
    ln = launch(tmp_path, job(guide, [U_BASE, MID]), guide, 1, init_from=12)
    assert f"--eval_every={NEVER}" in ln.argv
    assert ln.notes == (f"eval_every: -1 turns off the evaluation in scripts/mid_train.py, but its final save reads "
                        f"val_bpb, which only that evaluation sets (it would crash there); nanod passes {NEVER}, "
                        f"which runs it at most at step 0 and at the end",)


def test_minus_one_is_kept_where_the_script_guards_it(tmp_path, dash, head):
    assert "--eval-every=-1" in launch(tmp_path, job(dash, [BASE]), dash).argv
    ln = launch(tmp_path, job(head, [{"phase": "base", "args": {**BASE["args"], "sample_every": -1}}]), head)
    assert {"--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1", "--save-every=4"} <= set(ln.argv)
    assert ln.notes == ()


def test_job_flag_style_overrides_detection(tmp_path, dash):
    spec = job(dash, [BASE], nanochat={"flag_style": "underscore"})
    assert "--device_batch_size=4" in launch(tmp_path, spec, dash).argv


def test_values_are_spelled_the_way_each_parser_reads_them(tmp_path, dash, guide):
    args = {**BASE["args"], "fp8": True, "matrix_lr": 1.0}
    ln = launch(tmp_path, job(dash, [{"phase": "base", "args": args}]), dash)
    assert "--fp8" in ln.argv and "--matrix-lr=1.0" in ln.argv
    ln = launch(tmp_path, job(dash, [{"phase": "base", "args": {**args, "fp8": False}}]), dash)
    assert not any(a.startswith("--fp8") for a in ln.argv)
    ln = launch(tmp_path, job(guide, [{"phase": "base", "args": {**U_BASE["args"], "matrix_lr": 1}}]), guide)
    assert "--matrix_lr=1.0" in ln.argv  # the configurator refuses an int where its default is a float
    uargs = {**U_BASE["args"], "matrix_lr": 1.0, "run": "a=b"}
    with pytest.raises(NanochatRefused, match="'='"):
        launch(tmp_path, job(guide, [{"phase": "base", "args": uargs}]), guide)


def test_resume_repeats_the_arguments_and_pins_the_total_batch_from_the_meta(tmp_path, dash):
    spec = job(dash, [BASE])
    first = launch(tmp_path, spec, dash)
    write_checkpoint(tmp_path / "nc/base_checkpoints/d4", 8, meta={"step": 8, "total_batch_size": 1024,
                                                                   "user_config": {"total_batch_size": -1}})
    again = launch(tmp_path, spec, dash, args={**BASE["args"], "device_batch_size": 2}, resume_from=8)
    expected = [a if a != "--device-batch-size=4" else "--device-batch-size=2" for a in first.argv]
    assert again.argv == expected + ["--total-batch-size=1024", "--resume-from-step=8"]


def test_resume_pins_the_configurators_total_batch_from_user_config(tmp_path, guide):
    spec = job(guide, [{"phase": "base", "args": {k: v for k, v in U_BASE["args"].items()
                                                   if k != "total_batch_size"}}])
    write_checkpoint(tmp_path / "nc/base_checkpoints/d4", 4, meta={"step": 4, "user_config": {"total_batch_size": 2048}})
    ln = launch(tmp_path, spec, guide, resume_from=4)
    assert ln.argv[-2:] == ["--total_batch_size=2048", "--resume_from_step=4"]


def test_resume_keeps_an_explicit_total_batch(tmp_path, guide):
    spec = job(guide, [U_BASE])
    write_checkpoint(tmp_path / "nc/base_checkpoints/d4", 4, meta={"step": 4, "user_config": {"total_batch_size": 9}})
    ln = launch(tmp_path, spec, guide, resume_from=4)
    assert ln.argv.count("--total_batch_size=1024") == 1 and ln.argv[-1] == "--resume_from_step=4"


def test_phase_that_cannot_resume_refuses_a_resume_step(tmp_path, dash):
    spec = job(dash, [BASE, SFT])
    ad = adapter_for(tmp_path, spec, dash)
    assert ad.can_resume("base") and not ad.can_resume("sft")
    with pytest.raises(NanochatRefused, match="cannot resume"):
        ad.build_launch(spec, 1, args=SFT["args"], resume_from=3, init_from=12)


def test_sft_names_its_input_checkpoint_instead_of_trusting_the_newest_model_file(tmp_path, dash, guide):
    ln = launch(tmp_path, job(dash, [BASE, SFT]), dash, 1, init_from=12)
    assert ln.argv[2] == "scripts.chat_sft" and ln.argv[-2:] == ["--model-tag=d4", "--model-step=12"]
    ln = launch(tmp_path, job(guide, [U_BASE, MID, U_SFT]), guide, 2, init_from=6)
    assert ln.argv[-3:] == ["--model_tag=d4", "--source=mid", "--step=6"]
    ln = launch(tmp_path, job(guide, [U_BASE, U_SFT]), guide, 1, init_from=12)
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


# ---- nanod's defaults where they are safe ---------------------------------------------

def test_compile_stays_on_for_sft_where_the_checkout_compiles_with_fullgraph(tmp_path, head, guide):
    h = adapter_for(tmp_path, job(head, [BASE, SFT]), head)
    assert h.default_env("sft") == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    ln = launch(tmp_path, job(head, [BASE, SFT]), head, 1, init_from=12)
    assert ln.notes == ("TORCH_COMPILE_DISABLE not set for sft (nanod's default for mid and sft): nanochat/optim.py "
                        "compiles with fullgraph=True, which fails on the first step with compiling disabled",)
    g = adapter_for(tmp_path, job(guide, [U_BASE, MID, U_SFT]), guide)
    assert g.default_env("mid")["TORCH_COMPILE_DISABLE"] == g.default_env("sft")["TORCH_COMPILE_DISABLE"] == "1"
    assert "TORCH_COMPILE_DISABLE" not in g.default_env("base")


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


def test_an_optimizer_file_cut_short_by_a_kill_is_not_complete(tmp_path, dash):
    """nanochat writes model, meta, then optimizer straight to the final names: a kill -9 during the
    optimizer's torch.save leaves a meta beside half a zip archive (seen under the real HEAD base_train,
    which then crash-looped on its resume)."""
    import io
    import zipfile
    ad = adapter_for(tmp_path, job(dash, [BASE]), dash)
    d = tmp_path / "nc/base_checkpoints/d4"
    write_checkpoint(d, 4)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # what torch.save writes: a zip archive, its end record last
        z.writestr("archive/data.pkl", b"x" * 5000)
    for step in (4, 8):
        write_checkpoint(d, step)
        layout.model_path(d, step).write_bytes(buf.getvalue())
        layout.optim_path(d, step).write_bytes(buf.getvalue())
    layout.optim_path(d, 8).write_bytes(buf.getvalue()[:3000])
    assert ad.is_complete(d, 4) and not ad.is_complete(d, 8) and ad.latest_complete(d) == 4
    assert "optim_000008_rank0.pt is cut short" in layout.why_incomplete(d, 8)


def test_configurator_sft_checkpoint_is_complete_without_optimizer_files(tmp_path, guide):
    ad = adapter_for(tmp_path, job(guide, [U_BASE, MID, U_SFT], gpus=[0, 1], nanochat={"nproc_per_node": 2}), guide)
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


# ---- flags against the script's own options, before a job is accepted ------------------

def test_a_flag_the_script_does_not_have_is_refused_naming_flag_phase_script_and_hint(tmp_path, guide, head):
    """The guide's own plan: mid save_every and sft max_tokens/save_every exist in no nanochat script."""
    mid = {**MID, "args": {**MID["args"], "save_every": 100}}
    sft = {**U_SFT, "args": {**U_SFT["args"], "max_tokens": 1024, "save_every": 100}}
    with pytest.raises(NanochatRefused) as e:
        check_job(job(guide, [U_BASE, mid, sft]), settings_for(tmp_path, guide))
    assert str(e.value) == (
        "job nc: phases.mid.args.save_every: no such option in scripts/mid_train.py (mid_train saves only at its "
        "end: drop save_every); phases.sft.args.max_tokens: no such option in scripts/chat_sft.py (chat_sft has no "
        "max_tokens; HEAD calls it max_seq_len, this checkout has neither: drop it); phases.sft.args.save_every: "
        "no such option in scripts/chat_sft.py (chat_sft saves only at its end: drop save_every)")
    sft = {**SFT, "args": {**SFT["args"], "max_tokens": 1024}}
    with pytest.raises(NanochatRefused, match=r"phases.sft.args.max_tokens: no such option in scripts/chat_sft.py "
                                              r"\(chat_sft has no max_tokens; HEAD calls it max_seq_len\)$"):
        check_job(job(head, [BASE, sft]), settings_for(tmp_path, head))


def test_a_misspelt_flag_gets_the_nearest_option_as_a_hint(tmp_path, head):
    base = {"phase": "base", "args": {**BASE["args"], "device_batch_sise": 2}}
    with pytest.raises(NanochatRefused, match=r"device_batch_sise: no such option in scripts/base_train.py "
                                              r"\(did you mean device_batch_size\?\)"):
        check_job(job(head, [base]), settings_for(tmp_path, head))


@pytest.mark.parametrize("key, value, why", [
    ("eval_tokens", 2.5, "wants an int, got 2.5"), ("save_every", True, "wants an int, got True"),
    ("run", 3, "wants a str, got 3"), ("matrix_lr", "fast", "wants a float, got 'fast'")])
def test_a_value_of_the_wrong_type_for_the_configurator_is_refused(tmp_path, guide, key, value, why):
    base = {"phase": "base", "args": {**U_BASE["args"], key: value}}
    with pytest.raises(NanochatRefused, match=f"phases.base.args.{key}: scripts/base_train.py {why}"):
        check_job(job(guide, [base]), settings_for(tmp_path, guide))


def test_argparse_types_and_choices_are_checked_and_its_str_takes_anything(tmp_path, head):
    for key, value, why in (("fp8_recipe", "fast", "accepts only rowwise, tensorwise, got 'fast'"),
                            ("eval_tokens", 1.5, "wants an int, got 1.5")):
        base = {"phase": "base", "args": {**BASE["args"], key: value}}
        with pytest.raises(NanochatRefused, match=f"phases.base.args.{key}: scripts/base_train.py {why}"):
            check_job(job(head, [base]), settings_for(tmp_path, head))
    check_job(job(head, [{"phase": "base", "args": {**BASE["args"], "run": 7, "fp8": True}}]),
              settings_for(tmp_path, head))


def test_the_inbox_and_submit_refuse_what_check_job_refuses(tmp_path, dash):
    """One check, two doors: `nanod submit` exits 2 and copies nothing; the inbox rejects the file with
    the same reason beside it."""
    import threading

    import yaml

    from daemon.inbox import Inbox
    from nanochat_harness import nanod
    home = tmp_path / "home"
    (home / "jobs").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)
    (home / "config.toml").write_text(f'nanochat_repos = ["{dash}"]\nnanochat_base_dir = "{tmp_path / "nc"}"\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "model_tag": "d4", "runner": "nanochat",
                                   "nanochat": {"repo": str(dash), "python": ".venv/bin/python"},
                                   "phases": [{"phase": "base", "args": {**BASE["args"], "warp": 9}}]}))
    r = nanod(home, "submit", str(bad))
    why = "job bad: phases.base.args.warp: no such option in scripts/base_train.py"
    assert r.returncode == 2 and why in r.stderr and not (home / "jobs" / "bad.yaml").exists()
    inbox = Inbox(load_settings(home=home, settle_time=0.1, poll_interval=0.05), threading.Event())
    inbox.start()
    try:
        (home / "jobs" / "bad.yaml").write_bytes(bad.read_bytes())
        results = wait_until(inbox.take, timeout=5, message="the inbox's verdict")
    finally:
        inbox.stop()
    assert [x.error for x in results] == [f"bad.yaml: {why}"]
    assert (home / "jobs" / "bad.yaml.rejected").read_text().strip() == f"bad.yaml: {why}"


def guide_plan(repo: Path, *, runnable: bool = False, **top):
    """DESIGN.md's example plan (the training safety guide's, 8 GB card) on a nanochat checkout; runnable:
    without the three flags no nanochat script has (mid save_every, sft max_tokens and save_every)."""
    import yaml
    data = yaml.safe_load((Path(__file__).parent / "fixtures" / "design-plan.yaml").read_text())
    data.update(runner="nanochat", nanochat={"repo": str(repo), "python": ".venv/bin/python"}, **top)
    if runnable:
        for p in data["phases"]:
            for key in {"mid": ("save_every",), "sft": ("save_every", "max_tokens")}.get(p["phase"], ()):
                p["args"].pop(key)
    return parse_job(data, default_name="d8-4060")


def test_nanod_check_fails_the_guides_plan_per_phase_and_passes_it_without_those_flags(tmp_path, guide):
    from daemon import preflight
    from daemon.gpu.vram import GpuInfo, GpuReading
    card = GpuReading("nvml", [GpuInfo(0, "NVIDIA GeForce RTX 4060", 8188 << 20, 300 << 20, 7888 << 20, 0)])
    settings = settings_for(tmp_path, guide)
    checks = {c.name: c for c in preflight.check_job(settings, guide_plan(guide), gpus=card)}
    assert checks["nanochat checkout"].level == "OK" and checks["base flags"].level == "OK"
    assert (checks["mid flags"].level, checks["sft flags"].level) == ("FAIL", "FAIL")
    assert checks["mid flags"].message.startswith("phases.mid.args.save_every: no such option in scripts/mid_train.py")
    assert "phases.sft.args.max_tokens" in checks["sft flags"].message
    checks = {c.name: c for c in preflight.check_job(settings, guide_plan(guide, runnable=True), gpus=card)}
    assert [c.line() for c in checks.values() if c.level == "FAIL"] == []
    # mid_train and chat_sft cannot save before their end: nothing to set, so no "set save_every" FAIL
    assert checks["mid save_every"].message.startswith("the mid script saves only at its end: a crash restarts")


def test_the_shipped_nanochat_example_is_the_guides_plan_and_the_guide_era_checkout_accepts_it(tmp_path, guide):
    import yaml
    from conftest import ROOT
    data = yaml.safe_load((ROOT / "jobs/examples/8gb-nanochat.yaml").read_text())
    data["nanochat"]["repo"] = str(guide)
    spec = parse_job(data, default_name="x")
    assert spec.phases == guide_plan(guide, runnable=True).phases   # the guide's flags less those none has
    check_job(spec, settings_for(tmp_path, guide))


def test_nanod_check_warns_that_head_sft_cannot_run_with_compiling_disabled(tmp_path, head):
    from daemon import preflight
    from daemon.gpu.vram import GpuReading
    settings, none = settings_for(tmp_path, head), GpuReading("none", [], note="no GPU")
    plan = job(head, [BASE, {**SFT, "env": {"TORCH_COMPILE_DISABLE": "1"}}])
    checks = {c.name: c for c in preflight.check_phase(settings, plan, 1, gpus=none)}
    assert checks["sft torch.compile"].level == "WARN"
    assert "nanochat/optim.py compiles with fullgraph=True" in checks["sft torch.compile"].message
    assert "sft torch.compile" not in {c.name for c in preflight.check_phase(settings, job(head, [BASE, SFT]), 1,
                                                                             gpus=none)}


# ---- the stand-in: CUDA out-of-memory texts, several ranks, a kill in the middle of a save ----

def run_launch(ln, log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
    env.update(ln.env)
    env.update(STANDIN_FAST)
    env.update(extra_env or {})
    with open(log, "ab") as f:
        return subprocess.Popen(ln.argv, cwd=ln.cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


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


def test_standin_oom_is_classified_oom_and_halving_fits(tmp_path, dash):
    spec = job(dash, [BASE])
    ad = adapter_for(tmp_path, spec, dash)
    for text in ("torch", "driver"):
        log = tmp_path / f"{text}.log"
        code = run_launch(ad.build_launch(spec, 0, args=BASE["args"], resume_from=None, init_from=None), log,
                          {"STANDIN_OOM_ABOVE": "2", "STANDIN_OOM_TEXT": text}).wait(timeout=30)
        assert code == 1 and ad.classify_exit(code, log.read_text()[-8192:]) == Outcome.OOM
    ln = ad.build_launch(spec, 0, args={**BASE["args"], "device_batch_size": 2}, resume_from=None, init_from=None)
    assert run_launch(ln, tmp_path / "b.log", {"STANDIN_OOM_ABOVE": "2"}).wait(timeout=30) == 0


def test_standin_two_ranks_write_two_optimizer_files_and_only_then_the_checkpoint_counts(tmp_path, dash):
    spec = job(dash, [BASE], gpus=[0, 1])
    ad = adapter_for(tmp_path, spec, dash)
    ln = ad.build_launch(spec, 0, args=BASE["args"], resume_from=None, init_from=None)  # one process: no torchrun
    assert run_launch(ln, tmp_path / "a.log", {"STANDIN_WORLD_SIZE": "2"}).wait(timeout=30) == 0
    d = tmp_path / "nc/base_checkpoints/d4"
    assert all(layout.optim_path(d, s, r).exists() for s in (4, 8, 12) for r in (0, 1))
    layout.optim_path(d, 12, 1).unlink()
    assert ad.latest_complete(d) == 8


# ---- end to end: the real daemon over the stand-in ------------------------------------

def plan_yaml(repo: Path, phases: list[dict], **top) -> str:
    import yaml
    data = {"model_tag": "d4", "runner": "nanochat", "nanochat": {"repo": str(repo), "python": ".venv/bin/python"},
            "recovery": {"stall_timeout": "30s", "startup_grace": "30s", "kill_grace": "5s", "backoff_max": "1s"},
            "phases": phases, **top}
    return yaml.safe_dump(data, sort_keys=False)


slow = pytest.mark.slow  # the daemon, real processes, real signals


@slow
def test_e2e_kill9_during_and_between_saves_resumes_from_newest_complete_with_identical_args(start_daemon, dash):
    d = start_daemon(dash, {"STANDIN_STEP_SECONDS": "0.15", "STANDIN_SAVE_SECONDS": "0.4"})
    d.submit("nc", plan_yaml(dash, [BASE]))
    ckpts = d.nc / "base_checkpoints/d4"
    # 1. during the save of step 8: its model (maybe its meta) is there, its optimizer file not yet
    wait_until(lambda: layout.model_path(ckpts, 8).exists(), timeout=30)
    assert not layout.optim_path(ckpts, 8).exists()
    d.kill(d.wait_attempt("nc", 1))
    # 2. between saves: the relaunch has saved step 8 again, whole, and steps on towards 12
    second = d.wait_attempt("nc", 2, timeout=30)
    wait_until(lambda: layout.is_complete(ckpts, 8), timeout=30)
    assert not layout.model_path(ckpts, 12).exists()
    d.kill(second)
    rec = d.wait_state("nc", "done")
    first, second, third = d.argvs("nc")
    assert [a["resumed_from"] for a in rec["attempts"]] == [None, 4, 8]
    assert [a["outcome"] for a in rec["attempts"]] == ["crashed", "crashed", "completed"]
    assert [a["error"] for a in rec["attempts"]] == ["", "", ""]   # a kill -9 says nothing, not its last log line
    assert second == first + ["--total-batch-size=1024", "--resume-from-step=4"]
    assert third == first + ["--total-batch-size=1024", "--resume-from-step=8"]
    assert rec["phase_final_steps"] == {"base": 12} and layout.is_complete(ckpts, 12)


@slow
def test_e2e_oom_text_halves_device_batch_size_and_keeps_the_other_args(start_daemon, dash):
    d = start_daemon(dash, {"STANDIN_OOM_ABOVE": "2", "STANDIN_STEP_SECONDS": "0.02"})
    base = {"phase": "base", "args": {**BASE["args"], "device_batch_size": 8}}
    d.submit("nc", plan_yaml(dash, [base, SFT]))
    rec = d.wait_state("nc", "done")
    assert [a["outcome"] for a in rec["attempts"]] == ["oom", "oom", "completed", "completed"]
    assert [a["device_batch_size"] for a in rec["attempts"]] == [8, 4, 2, 2]
    assert rec["attempts"][0]["error"].startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")
    argvs = d.argvs("nc")
    assert [a for a in argvs[0] if "batch" not in a] == [a for a in argvs[2] if "batch" not in a]
    assert "--device-batch-size=2" in argvs[2] and "--device-batch-size=2" in argvs[3]
    assert sum(e["kind"] == "oom_backoff" for e in rec["events"]) == 2


@slow
def test_e2e_unlisted_checkout_is_rejected_in_the_inbox_and_never_runs(start_daemon, dash, tmp_path):
    other = make_checkout(tmp_path / "not-listed")
    d = start_daemon(dash)
    path = d.submit("evil", plan_yaml(other, [BASE]))
    marker = wait_until(lambda: path.with_name(path.name + ".rejected").exists() and
                        path.with_name(path.name + ".rejected"), timeout=10)
    assert "not in the operator's nanochat_repos" in marker.read_text() and d.record("evil") == {}


# ---- device_batch_size: auto (nanochat has no auto-fit) -----------------------------------

AUTO_BASE = {"phase": "base", "args": {**BASE["args"], "device_batch_size": "auto", "total_batch_size": 1024}}


def test_auto_gets_a_concrete_batch_and_a_note_and_is_not_refused_by_the_flag_check(tmp_path, dash):
    from daemon.trainers.nanochat_check import list_flag_problems
    spec = job(dash, [AUTO_BASE])
    assert list_flag_problems(spec, 0) == []
    ln = launch(tmp_path, spec, dash)
    assert isinstance(ln.device_batch_size, int) and 1024 // 64 % ln.device_batch_size == 0
    assert f"--device-batch-size={ln.device_batch_size}" in ln.argv and "--device-batch-size=auto" not in ln.argv
    assert [n for n in ln.notes if n.startswith("device_batch_size auto: nanochat has no auto-fit")]


def test_auto_without_a_gpu_takes_the_phase_default_capped_by_the_rows_and_says_so(dash):
    from daemon.gpu.vram import GpuReading
    from daemon.trainers.nanochat import auto_batch_size
    none = GpuReading("none", [], note="no NVIDIA GPU found (NVML: not found)")
    chosen, note = auto_batch_size(job(dash, [AUTO_BASE]), 0, gpus=none)
    assert chosen == 16   # base's default 32, but a step has 1024 / 64 = 16 rows
    assert note == ("device_batch_size auto: nanochat has no auto-fit and no GPU is visible here (no NVIDIA GPU "
                    "found (NVML: not found)): base's default, 16; an out-of-memory halves it")


def test_auto_on_a_gpu_is_the_largest_batch_nanods_estimate_fits_in_the_target(dash):
    from daemon import preflight
    from daemon.gpu.vram import GpuInfo, GpuReading
    from daemon.trainers.nanochat import auto_batch_size
    big = {"phase": "base", "args": {"depth": 8, "max_seq_len": 2048, "device_batch_size": "auto",
                                     "num_iterations": 10}}
    spec = job(dash, [big])
    card = GpuReading("nvml", [GpuInfo(0, "NVIDIA GeForce RTX 4060", 8 << 30, 0, 8 << 30, 0)])
    chosen, note = auto_batch_size(spec, 0, gpus=card)
    flags = preflight.phase_flags(spec, 0)
    assert preflight.estimate_vram(flags, "base", chosen) <= 0.88 * (8 << 30) < \
        preflight.estimate_vram(flags, "base", 2 * chosen)
    assert f"nanod's VRAM estimate picks {chosen} for GPU 0 (8.0 GiB)" in note and "target 88%" in note


@slow
def test_e2e_auto_gets_a_number_the_attempt_records_and_an_oom_halves_it(start_daemon, dash):
    d = start_daemon(dash, {"STANDIN_OOM_ABOVE": "2", "STANDIN_STEP_SECONDS": "0.02"})
    d.submit("nc", plan_yaml(dash, [AUTO_BASE]))
    rec = d.wait_state("nc", "done")
    # 1024 tokens of 64-token rows: 16 rows a step caps the estimate (or base's default 32 without a GPU)
    assert [a["device_batch_size"] for a in rec["attempts"]] == [16, 8, 4, 2]
    assert [a["outcome"] for a in rec["attempts"]] == ["oom", "oom", "oom", "completed"]
    argvs = d.argvs("nc")
    assert "--device-batch-size=16" in argvs[0] and "--device-batch-size=2" in argvs[3]
    notes = [e["message"] for e in rec["events"] if e["kind"] == "runner_note"]
    assert len(notes) == 1 and notes[0].startswith("device_batch_size auto: nanochat has no auto-fit")
