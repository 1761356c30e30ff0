"""End-to-end claims about `python -m trainer`: real subprocesses, real signals, real files.

One uninterrupted base run (module fixture `ref`) is the yardstick; the other
runs share its NANOCHAT_BASE_DIR (so its tokenizer and embedded data) under
other model tags and must end with the same bits, or the same losses.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, wait_until
from trainer import exitcodes, layout

STEPS = 24
ARGS = ["--depth=2", "--max_seq_len=32", "--device_batch_size=2", "--total_batch_size=128",
        f"--num_iterations={STEPS}", "--save_every=3"]
STEP_LINE = re.compile(r"^step (\d{5})/(\d{5}) \((\d+\.\d\d)%\) \| loss: (\d+\.\d{6}) \| lrm: (\d+\.\d\d) \| "
                       r"dt: (\d+\.\d\d)ms \| tok/sec: ([\d,]+)$")


class Run:
    """One trainer process with its stdout/stderr in files (as the daemon runs it)."""
    count = 0

    def __init__(self, root, phase, *args, tag="run", env=None):
        Run.count += 1
        self.out_path = root / f"{tag}-{Run.count}.out"
        self.err_path = root / f"{tag}-{Run.count}.err"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
        # one thread: tiny matrices gain nothing from more, and a busy machine makes OpenMP spin
        full_env.update(NANOCHAT_BASE_DIR=str(root), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([PYTHON, "-m", "trainer", phase, *args, f"--model_tag={tag}"],
                                         cwd=ROOT, env=full_env, stdout=out, stderr=err)

    def out(self) -> str:
        return self.out_path.read_text()

    def err(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout=120) -> int:
        return self.proc.wait(timeout=timeout)

    def step_lines(self) -> list[str]:
        return [line for line in self.out().splitlines() if line.startswith("step ")]

    def losses(self) -> dict[int, float]:
        return {int(m.group(1)): float(m.group(4)) for m in map(STEP_LINE.match, self.step_lines()) if m}

    def wait_for_step(self, k: int, timeout=60) -> None:
        wait_until(lambda: f"step {k:05d}/" in self.out() or self.proc.poll() is not None, timeout, 0.01,
                   f"step line {k}")


def finish(root, *args, tag, env=None) -> Run:
    run = Run(root, "base", *args, tag=tag, env=env)
    rc = run.wait()
    assert rc == exitcodes.OK, f"exit {rc}\n{run.err()}"
    return run


def ckpt(root, tag, phase="base"):
    return layout.checkpoint_dir(root, phase, tag)


def assert_same_bits(dir_a, dir_b, step):
    for path_of in (layout.model_path, lambda d, s: layout.optim_path(d, s, 0)):
        a = torch.load(path_of(dir_a, step), weights_only=True)
        b = torch.load(path_of(dir_b, step), weights_only=True)
        flat_a, flat_b = _flatten(a), _flatten(b)
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            if isinstance(flat_a[key], torch.Tensor):
                assert torch.equal(flat_a[key], flat_b[key]), f"{path_of(dir_a, step).name}: {key} differs"


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _flatten(v, f"{prefix}{i}.").items()}
    return {prefix: obj}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("nanochat")
    run = finish(root, *ARGS, tag="ref")
    return root, run


def test_each_phase_leaves_complete_checkpoints_in_nanochat_layout(ref):
    root, run = ref
    lines = run.step_lines()
    assert len(lines) == STEPS and all(STEP_LINE.match(line) for line in lines), lines[:3]
    assert lines[12].startswith(f"step 00012/{STEPS:05d} (50.00%)")
    losses = run.losses()
    assert losses[STEPS - 1] < losses[0] - 1.0, "the loss should fall visibly on the embedded data"
    base = ckpt(root, "ref")
    assert layout.complete_steps(base) == list(range(3, STEPS + 1, 3))
    meta = layout.read_meta(base, STEPS)
    assert meta["nanod"] == {**meta["nanod"], "format": 1, "optim_ranks": 1, "phase": "base"}
    for key in ("model_config", "user_config", "device_batch_size", "total_batch_size", "num_iterations",
                "schedule", "dataloader_state_dict", "loop_state", "max_seq_len"):
        assert key in meta, key
    assert not [p for p in base.iterdir() if layout.is_temp(p)]

    mid = Run(root, "mid", "--device_batch_size=4", "--num_iterations=4", "--save_every=2", tag="ref")
    assert mid.wait() == 0, mid.err()
    assert "initialised from base step 24" in mid.err()
    assert layout.complete_steps(ckpt(root, "ref", "mid")) == [2, 4]
    sft = Run(root, "sft", "--device_batch_size=2", "--max_tokens=32", "--total_batch_size=128",
              "--num_iterations=3", tag="ref")
    assert sft.wait() == 0, sft.err()
    assert "initialised from mid step 4" in sft.err()
    sft_dir = ckpt(root, "ref", "sft")
    assert layout.complete_steps(sft_dir) == [3]
    assert layout.optim_path(sft_dir, 3).exists()  # sft keeps its optimizer state too
    assert layout.read_meta(sft_dir, 3)["nanod"]["init_from"] == {"phase": "mid", "step": 4}


def test_save_every_minutes_saves_on_wall_time_without_a_step_interval(ref):
    root, _ = ref
    args = [a for a in ARGS if not a.startswith("--save_every")]
    run = Run(root, "base", *args, "--save_every=-1", "--save_every_minutes=0.0005", tag="minutes")  # every 30 ms
    assert run.wait() == 0, run.err()
    steps = layout.complete_steps(ckpt(root, "minutes"))
    assert steps[-1] == STEPS and len(steps) >= 3, f"wall-time saves expected before the final one: {steps}"


def test_kill_9_anywhere_then_resume_auto_ends_bitwise_equal(ref):
    root, _ = ref
    rng = random.Random(20240601)
    resume = ["--resume_from_step=auto"]
    kills = 0
    # a kill at a random step, a kill in the middle of a (slowed) save, another random one
    for attempt in ("step", "save", "step"):
        done = layout.latest_complete(ckpt(root, "kill")) or 0
        if attempt == "save":
            run = Run(root, "base", *ARGS, *resume, tag="kill", env={"NANOD_FAULT_SLOW_SAVE_MS": "300"})
            d = ckpt(root, "kill")
            torn = lambda: [s for s in layout.list_steps(d) if s > done and not layout.is_complete(d, s)]
            steps = wait_until(lambda: torn() or run.proc.poll() is not None, 60, 0.005, "a save in flight")
        else:
            run = Run(root, "base", *ARGS, *resume, tag="kill")
            run.wait_for_step(rng.randint(done + 1, min(done + 8, STEPS - 2)))
        run.proc.send_signal(signal.SIGKILL)
        kills += run.wait() == -signal.SIGKILL
        if attempt == "save" and isinstance(steps, list):
            assert not layout.is_complete(d, steps[0])  # the torn one is there and must be skipped
    assert kills >= 2
    finish(root, *ARGS, *resume, tag="kill")
    assert_same_bits(ckpt(root, "ref"), ckpt(root, "kill"), STEPS)


def test_resume_skips_a_truncated_model_and_a_missing_meta(ref):
    root, _ = ref
    src, dst = ckpt(root, "ref"), ckpt(root, "torn")
    shutil.copytree(src, dst)
    with open(layout.model_path(dst, STEPS), "r+b") as f:
        f.truncate(1000)
    layout.meta_path(dst, STEPS - 3).unlink()
    run = finish(root, *ARGS, "--resume_from_step=auto", tag="torn")
    assert f"skipping checkpoint step {STEPS}" in run.err()
    assert f"skipping checkpoint step {STEPS - 3}" in run.err()
    assert f"resumed from step {STEPS - 6} (" in run.err()
    assert_same_bits(src, dst, STEPS)


def test_sigterm_saves_the_current_step_exits_interrupted_and_resumes_exactly(ref):
    root, _ = ref
    run = Run(root, "base", *ARGS, tag="term")
    run.wait_for_step(4)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == exitcodes.INTERRUPTED, run.err()
    last = max(run.losses())
    d = ckpt(root, "term")
    assert layout.latest_complete(d) == last + 1, "the emergency checkpoint holds every finished step"
    assert f"emergency checkpoint step {last + 1}" in run.err()
    finish(root, *ARGS, "--resume_from_step=auto", tag="term")
    assert_same_bits(ckpt(root, "ref"), d, STEPS)


def test_oom_exits_with_one_line_and_half_the_batch_keeps_the_loss_trajectory(ref):
    root, ref_run = ref
    env = {"NANOD_FAULT_OOM_ABOVE": "1"}
    run = Run(root, "base", *ARGS, "--resume_from_step=auto", tag="oom", env=env)
    assert run.wait() == exitcodes.OOM
    err = run.err().strip().splitlines()
    assert "Traceback" not in run.err()
    assert "out of memory" in err[-1] and "device_batch_size=2" in err[-1]
    halved = [a for a in ARGS if not a.startswith("--device_batch_size")] + ["--device_batch_size=1"]
    again = finish(root, *halved, "--resume_from_step=auto", tag="oom", env=env)
    want, got = ref_run.losses(), again.losses()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), f"step {k}"
    assert layout.read_meta(ckpt(root, "oom"), STEPS)["total_batch_size"] == 128


def test_a_resume_with_another_sequence_length_is_refused_naming_both(ref):
    root, _ = ref
    shutil.copytree(ckpt(root, "ref"), ckpt(root, "shape"))
    args = [a for a in ARGS if not a.startswith("--max_seq_len")] + ["--max_seq_len=64", "--resume_from_step=auto"]
    run = Run(root, "base", *args, tag="shape")
    assert run.wait() == exitcodes.BAD_ARGS
    err = run.err().strip()
    assert "Traceback" not in err
    assert "max_seq_len is 64 now but 32 in the checkpoint" in err.splitlines()[-1]


def test_sft_with_nanochats_max_seq_len_pads_rows_to_it_as_max_tokens(ref):
    root, _ = ref
    shutil.copytree(ckpt(root, "ref"), ckpt(root, "sftlen"))
    run = Run(root, "sft", "--max_seq_len=16", "--device_batch_size=2", "--total_batch_size=64",
              "--num_iterations=2", tag="sftlen")
    assert run.wait() == exitcodes.OK, run.err()
    meta = layout.read_meta(ckpt(root, "sftlen", "sft"), 2)
    assert meta["max_tokens"] == 16 and meta["grad_accum_steps"] == 2  # 64 tokens = 2 rows x 16 x 2


def test_disk_guard_pauses_before_a_save_and_sigterm_exits_without_saving(ref):
    root, _ = ref
    env = {"NANOD_DISK_RESERVE": str(10**18), "NANOD_DISK_POLL": "0.1"}
    run = Run(root, "base", *ARGS, tag="disk", env=env)
    wait_until(lambda: "paused:" in run.out(), 60, 0.05, "the paused line")
    paused = [line for line in run.out().splitlines() if line.startswith("paused:")]
    assert re.fullmatch(r"paused: waiting for disk space before saving step 3: need \S+ free \S+", paused[0])
    assert run.proc.poll() is None, "the trainer waits for space"
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == exitcodes.INTERRUPTED
    assert "not saved" in run.err()
    assert layout.complete_steps(ckpt(root, "disk")) == []


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path, leave: int) -> None:
    """Write zeros into `path` until only about `leave` bytes stay free on its filesystem."""
    free = shutil.disk_usage(path.parent).free
    with open(path, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:
            pass


def test_a_full_disk_pauses_then_enospc_mid_save_keeps_the_previous_checkpoint(ref, tmpfs):
    root, _ = ref
    (root / "base_checkpoints").mkdir(exist_ok=True)
    d = tmpfs / "enospc"
    d.mkdir()
    os.symlink(d, ckpt(root, "enospc"))  # the checkpoints, and only they, live on the small filesystem
    filler = tmpfs / "filler"
    _fill(filler, leave=1 << 20)
    args = [a for a in ARGS if not a.startswith(("--num_iterations", "--save_every"))] + ["--num_iterations=6", "--save_every=3"]
    run = Run(root, "base", *args, tag="enospc", env={"NANOD_DISK_POLL": "0.1", "NANOD_FAULT_SLOW_SAVE_MS": "800"})
    wait_until(lambda: "paused:" in run.out(), 60, 0.05, "the guard's paused line")
    filler.unlink()
    wait_until(lambda: "resumed: disk space available" in run.out(), 30, 0.05, "the resumed line")
    # step 3 is being written slowly; fill the disk after its model file lands so the optimizer file hits ENOSPC
    wait_until(lambda: layout.complete_steps(d) == [3] or run.proc.poll() is not None, 60, 0.01, "step 3 saved")
    wait_until(lambda: layout.model_path(d, 6).exists() or run.proc.poll() is not None, 60, 0.005, "step 6's model")
    _fill(filler, leave=0)
    wait_until(lambda: run.out().count("paused:") >= 2 or run.proc.poll() is not None, 60, 0.05, "ENOSPC pause")
    assert run.proc.poll() is None, run.err()
    assert layout.complete_steps(d) == [3], "the previous checkpoint stays complete"
    assert not layout.model_path(d, 6).exists() and not [p for p in d.iterdir() if layout.is_temp(p)]
    filler.unlink()
    assert run.wait() == exitcodes.OK, run.err()
    assert layout.complete_steps(d) == [3, 6]
