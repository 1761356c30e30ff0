"""Preflight: the guide's checklist on good and bad plans, real filesystems, `nanod check` exit codes."""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from daemon import preflight
from daemon.config import load_settings
from daemon.gpu.vram import GpuInfo, GpuReading
from daemon.spec import parse_job
from trainer import layout

from conftest import PYTHON, ROOT

GIB = 1 << 30
DESIGN_PLAN = (Path(__file__).parent / "fixtures" / "design-plan.yaml").read_text()
RTX_4060 = GpuReading("nvml", [GpuInfo(0, "NVIDIA GeForce RTX 4060", 8188 << 20, 300 << 20, 7888 << 20, 0)])
NO_GPU = GpuReading("none", [], note="no NVIDIA GPU found (NVML: not found; nvidia-smi: not found)")


def spec_of(text: str = DESIGN_PLAN, **changes):
    data = yaml.safe_load(text)
    data.update(changes)
    return parse_job(data, default_name="job")


def one_phase(args: dict, phase="base", **top):
    return parse_job({"model_tag": "d8", "phases": [{"phase": phase, "args": args}], **top}, default_name="job")


@pytest.fixture
def settings(tmp_path):
    return load_settings(tmp_path / "home", nanochat_base_dir=tmp_path / "nanochat")


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def write_ckpt(d: Path, step: int, size: int = 100) -> None:
    d.mkdir(parents=True, exist_ok=True)
    layout.model_path(d, step).write_bytes(b"m" * size)
    layout.optim_path(d, step).write_bytes(b"o")
    layout.meta_path(d, step).write_text('{"step": %d}' % step)


# ---- the estimates ------------------------------------------------------------------------------------

def test_d8_shape_and_params_follow_nanochat_sizing():
    flags = preflight.phase_flags(spec_of(), 0)
    assert preflight.model_shape(flags) == (8, 512, 65536)
    assert sum(preflight.param_counts(flags)) == 12 * 8 * 512 ** 2 + 2 * 65536 * 512


def test_base_num_iterations_minus_one_is_nanochats_chinchilla_count():
    flags = preflight.phase_flags(one_phase({"depth": 8}), 0)
    assert preflight.num_iterations(flags, "base") == 3520  # the guide's 3,520 steps


def test_later_phases_inherit_the_shape_of_the_plans_base():
    spec = spec_of()
    assert preflight.model_shape(preflight.phase_flags(spec, 2))[:2] == (8, 512)
    mid_alone = parse_job({"model_tag": "d12", "phases": [{"phase": "mid"}]}, default_name="j")
    assert preflight.model_shape(preflight.phase_flags(mid_alone, 0))[0] == 12


def test_sfts_max_seq_len_is_its_row_length_as_max_tokens_is():
    plan = {"model_tag": "d8", "phases": [{"phase": "base", "args": {"depth": 8, "max_seq_len": 1024}},
                                          {"phase": "sft", "args": {}}]}
    for args, row in (({"max_seq_len": 256}, 256), ({"max_tokens": 256}, 256), ({}, 1024)):
        plan["phases"][1]["args"] = args
        flags = preflight.phase_flags(parse_job(plan, default_name="j"), 1)
        assert preflight.row_length(flags, "sft") == row, args


def test_an_existing_checkpoints_model_config_gives_the_real_shape(settings):
    spec = spec_of()
    d = layout.checkpoint_dir(settings.checkpoint_root, "base", "d8")
    write_ckpt(d, 250)
    layout.meta_path(d, 250).write_text('{"step": 250, "model_config": {"n_layer": 8, "n_embd": 512, "vocab_size": 4096}}')
    flags = preflight.flags_with_checkpoint_shape(settings, spec, 1)  # mid starts from it
    assert preflight.model_shape(flags) == (8, 512, 4096)
    assert preflight.estimate_vram(flags, "mid") < preflight.estimate_vram(preflight.phase_flags(spec, 1), "mid")


def test_the_guides_8gb_estimates_are_in_its_measured_range():
    spec = spec_of()
    base = preflight.estimate_vram(preflight.phase_flags(spec, 0), "base")
    mid = preflight.estimate_vram(preflight.phase_flags(spec, 1), "mid")
    assert 3 * GIB < base < 5 * GIB   # guide: ~4-4.5 GB
    assert 4 * GIB < mid < 6 * GIB    # guide: ~4-5 GB
    assert preflight.estimate_vram(preflight.phase_flags(spec, 1), "mid", device_batch_size=2) < mid


# ---- the checks ---------------------------------------------------------------------------------------

def test_design_example_plan_passes_on_an_8gb_card(settings):
    checks = preflight.check_job(settings, spec_of(), gpus=RTX_4060)
    assert [c.line() for c in checks if c.level != "OK"] == []
    names = by_name(checks)
    assert {"base vram", "mid vram", "sft vram", "mid input", "sft input", "checkpoint root writable"} <= set(names)


def test_default_nanochat_size_fails_on_an_8gb_card(settings):
    c = by_name(preflight.check_phase(settings, one_phase({"num_iterations": 10}), 0, gpus=RTX_4060))["base vram"]
    assert c.level == "FAIL" and "lower device_batch_size" in c.message


def test_vram_near_the_limit_warns(settings):
    spec = spec_of()
    need = preflight.estimate_vram(preflight.phase_flags(spec, 0), "base")
    tight = GpuReading("nvml", [GpuInfo(0, "card", 2 * need, 0, int(need / 0.9), 0)])
    assert by_name(preflight.check_phase(settings, spec, 0, gpus=tight))["base vram"].level == "WARN"


def test_oom_backoff_batch_size_is_what_is_checked(settings):
    spec = spec_of()
    mid = preflight.phase_flags(spec, 1)
    need2 = preflight.estimate_vram(mid, "mid", device_batch_size=2)
    card = GpuReading("nvml", [GpuInfo(0, "card", 8 * GIB, 0, int(need2 * 1.01), 0)])
    assert by_name(preflight.check_phase(settings, spec, 1, gpus=card))["mid vram"].level == "FAIL"
    assert by_name(preflight.check_phase(settings, spec, 1, gpus=card, device_batch_size=2))["mid vram"].level != "FAIL"


def test_no_gpu_warns_unless_the_phase_runs_on_cpu(settings):
    assert by_name(preflight.check_phase(settings, spec_of(), 0, gpus=NO_GPU))["base vram"].level == "WARN"
    cpu = one_phase({"depth": 8, "device_type": "cpu", "num_iterations": 10})
    assert by_name(preflight.check_phase(settings, cpu, 0, gpus=NO_GPU))["base vram"].level == "OK"


def test_a_missing_gpu_index_fails(settings):
    spec = spec_of(gpu=1)
    assert by_name(preflight.check_phase(settings, spec, 0, gpus=RTX_4060))["base vram"].level == "FAIL"


def test_save_every_minus_one_on_a_long_run_fails(settings):
    c = by_name(preflight.check_phase(settings, one_phase({"depth": 8, "num_iterations": 3520, "save_every": -1}), 0,
                                      gpus=RTX_4060))["base save_every"]
    assert c.level == "FAIL" and "100-250" in c.message


def test_save_every_minus_one_is_fine_on_a_tiny_run_or_with_save_every_minutes(settings):
    tiny = one_phase({"depth": 2, "num_iterations": 40, "total_batch_size": 2048, "save_every": -1})
    assert by_name(preflight.check_phase(settings, tiny, 0, gpus=NO_GPU))["base save_every"].level == "OK"
    timed = one_phase({"depth": 8, "num_iterations": 3520, "save_every": -1, "save_every_minutes": 30})
    assert by_name(preflight.check_phase(settings, timed, 0, gpus=NO_GPU))["base save_every"].level == "OK"


def test_save_every_a_third_of_a_long_run_warns(settings):
    spec = one_phase({"depth": 8, "num_iterations": 3000, "save_every": 1000})
    assert by_name(preflight.check_phase(settings, spec, 0, gpus=NO_GPU))["base save_every"].level == "WARN"


def test_allocator_default_is_nanods_and_a_job_override_without_it_warns(settings):
    plain = one_phase({"depth": 8, "num_iterations": 10})
    c = by_name(preflight.check_phase(settings, plain, 0, gpus=NO_GPU))["base allocator"]
    assert c.level == "OK" and "nanod's default" in c.message
    bad = one_phase({"depth": 8, "num_iterations": 10}, env={"PYTORCH_ALLOC_CONF": "max_split_size_mb:128"})
    c = by_name(preflight.check_phase(settings, bad, 0, gpus=NO_GPU))["base allocator"]
    assert c.level == "WARN" and "expandable_segments:True" in c.message


def test_unknown_flag_fails(settings):
    spec = one_phase({"depth": 8, "num_iteratons": 10})
    c = by_name(preflight.check_phase(settings, spec, 0, gpus=NO_GPU))["base flags"]
    assert c.level == "FAIL" and "num_iteratons" in c.message


def test_mid_without_a_base_checkpoint_fails_and_with_one_passes(settings):
    spec = one_phase({"num_iterations": 10}, phase="mid")
    c = by_name(preflight.check_phase(settings, spec, 0, gpus=NO_GPU))["mid input"]
    assert c.level == "FAIL" and "base_checkpoints/d8" in c.message
    write_ckpt(layout.checkpoint_dir(settings.checkpoint_root, "base", "d8"), 3520)
    c = by_name(preflight.check_phase(settings, spec, 0, gpus=NO_GPU))["mid input"]
    assert c.level == "OK" and "step 3520" in c.message


def test_sft_takes_mid_or_base_as_input(settings):
    spec = one_phase({"num_iterations": 10}, phase="sft")
    write_ckpt(layout.checkpoint_dir(settings.checkpoint_root, "base", "d8"), 100)
    assert by_name(preflight.check_phase(settings, spec, 0, gpus=NO_GPU))["sft input"].level == "OK"


def test_checkpoint_root_under_a_file_is_not_writable(tmp_path):
    (tmp_path / "afile").write_text("x")
    s = load_settings(tmp_path / "home", nanochat_base_dir=tmp_path / "afile" / "nanochat")
    c = by_name(preflight.check_dirs(s))["checkpoint root writable"]
    assert c.level == "FAIL" and "not a directory" in c.message


@pytest.fixture
def tmpfs(tmp_path):
    """A real 20 MB filesystem (skipped where mount is not allowed)."""
    mounted = []

    def make(name="fs", opts="size=20m"):
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_read_only_checkpoint_root_fails(tmpfs, tmp_path):
    ro = tmpfs("ro", "size=1m,ro")
    s = load_settings(tmp_path / "home", nanochat_base_dir=ro / "nanochat")
    c = by_name(preflight.check_dirs(s))["checkpoint root writable"]
    assert c.level == "FAIL" and "cannot write" in c.message


def test_disk_need_above_free_space_on_a_20mb_tmpfs_fails(tmpfs, tmp_path):
    root = tmpfs()
    s = load_settings(tmp_path / "home", nanochat_base_dir=root)
    spec = spec_of()  # d8 checkpoints are estimated at ~1 GB each
    reason = preflight.disk_shortfall(s, spec, 0)
    assert reason and "free on" in reason and "the base phase needs about" in reason
    c = by_name(preflight.check_phase(s, spec, 0, gpus=RTX_4060))["base disk"]
    assert c.level == "FAIL" and c.message == reason


def test_projection_uses_the_newest_real_checkpoint_and_space_returning_clears_the_shortfall(tmpfs, tmp_path):
    root = tmpfs()
    s = load_settings(tmp_path / "home", nanochat_base_dir=root, disk_margin="1MiB")
    spec = spec_of(retention={"keep_last": 2})
    base = layout.checkpoint_dir(root, "base", "d8")
    write_ckpt(base, 250, size=1 << 20)
    size = layout.size_of(base, 250)
    # one complete on disk, keep_last 2: two more are written before the oldest goes
    assert preflight.projected_disk_need(s, spec, 0) == 2 * size + (1 << 20)
    assert preflight.disk_shortfall(s, spec, 0) is None
    filler = root / "filler"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * (18 << 20))
        except OSError:
            pass  # ENOSPC: the disk is full, which is the point
    assert "the base phase needs about" in preflight.disk_shortfall(s, spec, 0)
    filler.unlink()
    assert preflight.disk_shortfall(s, spec, 0) is None


def test_projection_with_keep_last_reached_needs_one_checkpoint(settings):
    spec = spec_of(retention={"keep_last": 2})
    base = layout.checkpoint_dir(settings.checkpoint_root, "base", "d8")
    for step in (250, 500, 750):
        write_ckpt(base, step, size=1000)
    assert preflight.projected_disk_need(settings, spec, 0) == layout.size_of(base, 750) + settings.disk_margin


def test_mid_projection_uses_the_base_checkpoint_size_before_its_own_exist(settings):
    spec = spec_of()
    write_ckpt(layout.checkpoint_dir(settings.checkpoint_root, "base", "d8"), 3520, size=5000)
    size = layout.size_of(layout.checkpoint_dir(settings.checkpoint_root, "base", "d8"), 3520)
    assert preflight.projected_disk_need(settings, spec, 1) == 4 * size + settings.disk_margin


# ---- nanod check, as a user runs it -----------------------------------------------------------------

def nanod_check(tmp_path, text: str | None, name="plan.yaml") -> subprocess.CompletedProcess:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "nanochat"), "PATH": "/usr/bin:/bin"}
    cli = "import sys; from daemon.cli import main; sys.exit(main())"
    return subprocess.run([PYTHON, "-c", cli, "--home", str(tmp_path / "home"), "check", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_nanod_check_exits_0_on_the_design_plan(tmp_path):
    r = nanod_check(tmp_path, DESIGN_PLAN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK   base save_every:" in r.stdout
    assert all(line.split()[0] in ("OK", "WARN", "FAIL") for line in r.stdout.splitlines()[:-1])


def test_nanod_check_exits_1_on_a_fail(tmp_path):
    bad = DESIGN_PLAN.replace("save_every: 250", "save_every: -1")
    r = nanod_check(tmp_path, bad)
    assert r.returncode == 1
    assert "FAIL base save_every: save_every -1 on a 3520-step run" in r.stdout


def test_nanod_check_exits_2_on_an_invalid_job_file(tmp_path):
    r = nanod_check(tmp_path, textwrap.dedent("""\
        phases:
          - phase: base
            args: {device_batch_size: "2"}
        bogus: 1
        """))
    assert r.returncode == 2 and r.stderr.startswith("nanod check: plan.yaml:") and len(r.stderr.splitlines()) == 1
    assert nanod_check(tmp_path, None, name="missing.yaml").returncode == 2


def test_auto_batch_checks_the_least_it_needs_and_never_crashes(settings):
    spec = one_phase({"depth": 8, "device_batch_size": "auto", "max_seq_len": 2048, "num_iterations": 10})
    c = by_name(preflight.check_phase(settings, spec, 0, gpus=RTX_4060))["base vram"]
    assert c.level == "OK" and "batch 1 (device_batch_size auto" in c.message
    flags = preflight.phase_flags(spec, 0)
    assert preflight.estimate_vram(flags, "base") == preflight.estimate_vram(flags, "base", device_batch_size=1)
    huge = one_phase({"depth": 40, "device_batch_size": "auto", "num_iterations": 10})
    assert by_name(preflight.check_phase(settings, huge, 0, gpus=RTX_4060))["base vram"].level == "FAIL"


def test_batch_from_estimate_is_the_largest_divisor_within_the_target():
    flags = preflight.phase_flags(one_phase({"depth": 8, "max_seq_len": 2048}), 0)
    b = preflight.batch_from_estimate(flags, "base", 8 * GIB, 0.88)
    assert b is not None and 524288 // 2048 % b == 0
    assert preflight.estimate_vram(flags, "base", b) <= 0.88 * 8 * GIB
    bigger = [c for c in (2 * b, 4 * b) if 256 % c == 0]
    assert all(preflight.estimate_vram(flags, "base", c) > 0.88 * 8 * GIB for c in bigger)
    assert preflight.batch_from_estimate(flags, "base", 1 * GIB, 0.88) is None
