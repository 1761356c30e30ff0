"""Claims about the trainer's command line: nanochat's flags, one-line errors, a torch-free contract."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import PYTHON, ROOT
from trainer import exitcodes
from trainer.cli import BadArgs, parse_args
from trainer.options import known_flags

TINY = ["--depth=2", "--max_seq_len=32", "--device_batch_size=2", "--total_batch_size=128", "--num_iterations=2"]


def run_trainer(*argv, root=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(OMP_NUM_THREADS="1")
    if root is not None:
        env["NANOCHAT_BASE_DIR"] = str(root)
    return subprocess.run([PYTHON, "-m", "trainer", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_bad_args(r, *needles):
    assert r.returncode == exitcodes.BAD_ARGS, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("trainer: error: "), r.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_the_contract_modules_import_without_torch():
    code = ("import sys, trainer.layout, trainer.exitcodes, trainer.options, trainer.cli, trainer.faults;"
            "print('torch' in sys.modules)")
    r = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_the_design_plan_and_the_safety_guide_flags_are_all_known():
    plan = {"base": ["depth", "device_batch_size", "max_seq_len", "num_iterations", "save_every", "core_metric_every",
                     "run", "dtype", "sample_every", "eval_every", "eval_tokens", "total_batch_size", "model_tag"],
            "mid": ["device_batch_size", "max_seq_len", "num_iterations", "save_every", "eval_every", "init_step"],
            "sft": ["device_batch_size", "max_tokens", "num_iterations", "save_every", "eval_every", "init_step"]}
    for phase, flags in plan.items():
        assert set(flags) <= known_flags(phase), set(flags) - known_flags(phase)
        assert {"resume_from_step", "save_every_minutes", "data", "seed"} <= known_flags(phase)
    assert "max_tokens" not in known_flags("base")


def test_dash_and_underscore_and_separate_values_mean_the_same():
    a = parse_args(["base", "--device_batch_size=4", "--max-seq-len", "64", "--resume-from-step", "auto", "--fp8"])
    assert a[1].device_batch_size == 4 and a[1].max_seq_len == 64 and a[1].resume_from_step == "auto"
    assert a[1].fp8 is True
    assert parse_args(["sft", "--model_step=7"])[1].init_step == "7"  # nanochat's name for the init step


def test_sft_takes_max_seq_len_as_its_max_tokens_one_setting_under_two_names():
    # nanochat's chat_sft names the row length max_seq_len; the guide names it max_tokens
    for argv in (["--max_seq_len=64"], ["--max-seq-len", "64"], ["--max_tokens=64"],
                 ["--max_seq_len=64", "--max_tokens=64"]):
        _, opts, given = parse_args(["sft", *argv])
        assert opts.max_tokens == 64 and given == {"max_tokens": 64}, argv
    assert "max_seq_len" in known_flags("sft")


def test_sft_given_both_row_length_names_with_different_values_is_one_line_bad_args():
    r = run_trainer("sft", "--max_seq_len=64", "--max_tokens=128")
    assert_one_line_bad_args(r, "--max_tokens=128 and --max_seq_len=64", "give one")


@pytest.mark.parametrize("argv, needle", [
    (["base", "--no_such_flag=1"], "unknown flag --no_such_flag"),
    (["base", "--depth=eight"], "--depth must be an integer"),
    (["base", "--depth"], "needs a value"),
    (["mid", "--max_tokens=5"], "does not apply to phase mid"),
    (["train"], "first argument must be the phase"),
    (["base", "--resume_from_step=latest"], "step number or auto"),
    (["base", "--device_batch_size=0"], "at least 1"),
])
def test_bad_flags_exit_bad_args_with_one_line_and_no_traceback(argv, needle):
    with pytest.raises(BadArgs, match=needle.replace("-", r"\-")):
        parse_args(argv)


def test_bad_flags_from_the_command_line_are_one_line_without_torch():
    r = run_trainer("base", "--no-such-flag", "3")
    assert_one_line_bad_args(r, "unknown flag --no-such-flag")


def test_help_lists_every_flag_with_its_phases():
    r = run_trainer("--help")
    assert r.returncode == 0
    assert "--device_batch_size" in r.stdout and "--resume_from_step" in r.stdout and "[sft]" in r.stdout


def test_a_missing_data_path_is_bad_args(tmp_path):
    r = run_trainer("base", *TINY, f"--data={tmp_path / 'nowhere'}", root=tmp_path)
    assert_one_line_bad_args(r, "does not exist", "nowhere")


def test_a_total_batch_that_does_not_divide_is_bad_args_naming_the_numbers(tmp_path):
    argv = [a for a in TINY if not a.startswith("--total")] + ["--total_batch_size=100"]
    r = run_trainer("base", *argv, root=tmp_path)
    assert_one_line_bad_args(r, "total_batch_size 100", "2 x 32 = 64")


def test_mid_without_a_base_checkpoint_is_bad_args(tmp_path):
    r = run_trainer("mid", "--model_tag=d2", "--num_iterations=2", root=tmp_path)
    assert_one_line_bad_args(r, "to start mid from")


def test_a_text_file_trains_as_data(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("the cat sat on the mat. " * 400)
    r = run_trainer("base", *TINY, f"--data={data}", root=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("step ") == 2
