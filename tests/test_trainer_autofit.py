"""Claims about `--device_batch_size=auto` (trainer/autofit.py): real trainer processes on the CPU,
where NANOD_FAULT_OOM_ABOVE=B is the small card the search must find. Promise 16: the probe changes
memory, never the optimisation, so a run that chose B ends bitwise equal to a run given B."""
from __future__ import annotations

import re

import pytest

from test_trainer_run import Run, assert_same_bits, ckpt, finish
from trainer import exitcodes, layout
from trainer.autofit import bisect_largest
from trainer.cli import BadArgs, parse_args
from trainer.options import autofit_target, batch_candidates, default_batch_choice

STEPS = 6
# 256 tokens a step of rows of 32: 8 rows, so the candidates are 1, 2, 4 and 8
SHAPE = ["--depth=2", "--max_seq_len=32", "--total_batch_size=256", f"--num_iterations={STEPS}", "--save_every=3"]
LINE = re.compile(r"^auto-fit: device_batch_size (\d+) \((.*)\)$", re.M)


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """The yardstick: the same run given device_batch_size 2."""
    root = tmp_path_factory.mktemp("nanochat")
    finish(root, *SHAPE, "--device_batch_size=2", tag="given")
    return root


def test_auto_lands_on_the_simulated_card_prints_one_line_and_trains_bitwise_as_given(given):
    run = finish(given, *SHAPE, "--device_batch_size=auto", tag="auto", env={"NANOD_FAULT_OOM_ABOVE": "2"})
    lines = LINE.findall(run.err())
    assert len(lines) == 1, run.err()
    chosen, detail = lines[0]
    assert chosen == "2" and detail.startswith("probed 4 no, 2 yes in ") and "NANOD_FAULT_OOM_ABOVE=2" in detail
    assert "= 4 x 2 rows x 32" in run.err()   # grad_accum follows: the total batch is kept
    meta = layout.read_meta(ckpt(given, "auto"), STEPS)
    assert meta["device_batch_size"] == 2 and meta["grad_accum_steps"] == 4
    fit = meta["nanod"]["autofit"]
    assert (fit["how"], fit["chosen"], fit["probes"]) == ("probed", 2, [[4, False, None], [2, True, None]])
    assert meta["user_config"]["device_batch_size"] == "auto"
    # promise 16: weights and optimizer state as if the probes never ran, the data from its first row
    assert meta["dataloader_state_dict"] == layout.read_meta(ckpt(given, "given"), STEPS)["dataloader_state_dict"]
    for step in (3, STEPS):
        assert_same_bits(ckpt(given, "given"), ckpt(given, "auto"), step)


def test_a_resume_with_auto_reuses_the_checkpoints_batch_without_probing(given):
    env = {"NANOD_FAULT_OOM_ABOVE": "2", "NANOD_FAULT_CRASH_AT_STEP": "4"}
    crashed = Run(given, "base", *SHAPE, "--device_batch_size=auto", tag="resumed", env=env)
    assert crashed.wait() == 1, crashed.err()
    assert layout.complete_steps(ckpt(given, "resumed")) == [3]
    # no fault now: a probe would pick the CPU's default (8 rows), a different split of each step
    again = finish(given, *SHAPE, "--device_batch_size=auto", "--resume_from_step=auto", tag="resumed",
                   env={"NANOD_ATTEMPT": "2"})
    assert LINE.findall(again.err()) == [("2", "the checkpoint's, step 3: a resume does not probe again")], again.err()
    meta = layout.read_meta(ckpt(given, "resumed"), STEPS)
    assert meta["device_batch_size"] == 2 and meta["nanod"]["autofit"]["reused_from_step"] == 3
    assert meta["nanod"]["autofit"]["probes"] == [[4, False, None], [2, True, None]]   # the first attempt's
    assert_same_bits(ckpt(given, "given"), ckpt(given, "resumed"), STEPS)


def test_auto_without_any_divisor_is_one_line_bad_args(tmp_path):
    run = Run(tmp_path, "base", "--depth=2", "--max_seq_len=32", "--total_batch_size=100", "--num_iterations=1",
              "--device_batch_size=auto", tag="odd")
    assert run.wait() == exitcodes.BAD_ARGS
    assert run.err().strip().splitlines()[-1] == ("trainer: error: device_batch_size auto: total_batch_size 100 is "
                                                  "not a multiple of max_seq_len = 32, so no device_batch_size divides it")


@pytest.mark.parametrize("value, said", [("big", "must be an integer or auto, got 'big'"),
                                         ("0", "must be at least 1, got 0"), ("-3", "must be at least 1, got -3")])
def test_bad_device_batch_sizes_are_refused_in_one_line(value, said):
    with pytest.raises(BadArgs, match=re.escape(f"--device_batch_size {said}")):
        parse_args(["base", f"--device_batch_size={value}"])
    assert parse_args(["base", "--device_batch_size=Auto"])[1].device_batch_size == "auto"


def test_candidates_keep_the_total_batch_divisible_and_never_exceed_a_steps_rows():
    assert batch_candidates(524288, 2048) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # two ranks: 384 rows of 64 tokens are 192 a rank
    assert batch_candidates(384 * 64, 64, 2) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 192]
    assert batch_candidates(100, 32) == []


def test_the_search_asks_each_candidate_once_and_finds_the_largest_that_fits():
    candidates = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 192]
    for limit in (0, 1, 5, 12, 13, 192, 500):
        asked = []
        found = bisect_largest(candidates, lambda b: asked.append(b) or b <= limit)
        assert found == max([c for c in candidates if c <= limit], default=None)
        assert len(asked) == len(set(asked)) <= 4


def test_without_a_memory_limit_the_cpu_takes_the_phase_default_capped_by_the_rows():
    assert default_batch_choice("base", batch_candidates(524288, 2048)) == 32
    assert default_batch_choice("base", batch_candidates(256, 32)) == 8
    assert default_batch_choice("sft", batch_candidates(32 * 64, 64)) == 4
    assert default_batch_choice("base", [1, 3, 9, 27, 81]) == 27


def test_the_target_share_of_the_card_is_a_checked_setting():
    assert autofit_target({}) == 0.88 and autofit_target({"NANOD_AUTOFIT_TARGET": "0.9"}) == 0.9
    for bad in ("most", "1.5", "0.1"):
        with pytest.raises(ValueError, match="NANOD_AUTOFIT_TARGET"):
            autofit_target({"NANOD_AUTOFIT_TARGET": bad})


def test_when_nothing_fits_it_says_so_in_one_line_and_exits_out_of_memory(given):
    run = Run(given, "base", *SHAPE, "--device_batch_size=auto", tag="none", env={"NANOD_FAULT_OOM_ABOVE": "0"})
    assert run.wait() == exitcodes.OOM, run.err()
    said = [line for line in run.err().splitlines() if line.startswith("auto-fit:")]
    assert len(said) == 1 and said[0].startswith("auto-fit: no device_batch_size fits (probed 4 no, 2 no, 1 no in ")
    assert "not even device_batch_size 1 fits" in run.err().splitlines()[-1]  # no "retry with a smaller auto"
    assert not layout.list_steps(ckpt(given, "none"))


def test_the_daemon_reads_the_choice_and_the_failure_from_the_line():
    from daemon.trainers.builtin import parse_batch_choice
    assert parse_batch_choice("auto-fit: device_batch_size 12 (probed 16 no, 12 yes in 2.0s; peak ...)") == 12
    assert parse_batch_choice("auto-fit: no device_batch_size fits (probed 1 no in 0.1s; ...)") == 1
    assert parse_batch_choice("step 00001/00010 (10.00%) | loss: 1.0") is None
    assert parse_batch_choice("  auto-fit: device_batch_size 3") is None   # only the trainer's own line
