"""Claims about the built-in trainer under torchrun: two ranks on the CPU (gloo), real processes and signals.

One undisturbed two-rank run (module fixture `pair`) and one single-process run
of the same total batch share a NANOCHAT_BASE_DIR (so the tokenizer and the
embedded data); the other runs use that root under other model tags.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import psutil
import pytest
import torch

from conftest import PYTHON, ROOT, wait_until
from daemon.launchers import torchrun
from daemon.retention import prune_dir
from trainer import exitcodes, layout

pytestmark = pytest.mark.slow

STEPS = 40
# 256 tokens a step: two ranks x 2 rows x 32 tokens x 2 passes, or one process x 2 rows x 4 passes
ARGS = ["--depth=2", "--max_seq_len=32", "--device_batch_size=2", "--total_batch_size=256",
        f"--num_iterations={STEPS}", "--save_every=8"]
LOSS = re.compile(r"^step (\d{5})/\d{5} .*\| loss: (\d+\.\d{6})")


class Group:
    """`torchrun --nproc_per_node=N -m trainer ...` (or one plain process), its output in files."""
    count = 0

    def __init__(self, root, nproc, *args, tag, env=None, phase="base"):
        Group.count += 1
        self.out_path = root / f"{tag}-{Group.count}.out"
        self.err_path = root / f"{tag}-{Group.count}.err"
        full = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
        full.update(NANOCHAT_BASE_DIR=str(root), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                    NANOD_DIST_TIMEOUT="60", **(env or {}))
        argv = [PYTHON, "-m", "trainer", phase, *args, f"--model_tag={tag}"]
        if nproc > 1:
            argv = torchrun.wrap(argv, nproc)
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=full, stdout=out, stderr=err)

    def out(self) -> str:
        return self.out_path.read_text()

    def err(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout=180) -> int:
        return self.proc.wait(timeout=timeout)

    def losses(self) -> dict[int, float]:
        return {int(m.group(1)): float(m.group(2)) for m in map(LOSS.match, self.out().splitlines()) if m}

    def ranks(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def wait_for_step(self, k: int, timeout=120) -> None:
        wait_until(lambda: f"step {k:05d}/" in self.out() or self.proc.poll() is not None, timeout, 0.02,
                   f"step line {k}")


def finish(root, nproc, *args, tag, env=None) -> Group:
    g = Group(root, nproc, *args, tag=tag, env=env)
    rc = g.wait()
    assert rc == exitcodes.OK, f"exit {rc}\n{g.err()[-3000:]}"
    return g


def weights(root, tag, step=STEPS):
    return torch.load(layout.model_path(layout.checkpoint_dir(root, "base", tag), step), weights_only=True)


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"differ: {differing[:5]}"


def copy_checkpoints(root, src_tag, dst_tag, steps):
    src, dst = layout.checkpoint_dir(root, "base", src_tag), layout.checkpoint_dir(root, "base", dst_tag)
    dst.mkdir(parents=True)
    for step in steps:
        for f in layout.files_of(src, step):
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("nanochat")
    one = finish(root, 1, *ARGS, tag="one")   # first: it trains the tokenizer the others reuse
    two = finish(root, 2, *ARGS, tag="two")
    return root, one, two


def test_two_ranks_complete_the_plan_every_rank_saving_its_part_and_rank_0_alone_printing(pair):
    root, one, two = pair
    d = layout.checkpoint_dir(root, "base", "two")
    assert layout.complete_steps(d) == [8, 16, 24, 32, 40]
    for step in (8, 16, 24, 32, 40):
        assert layout.optim_path(d, step, 0).exists() and layout.optim_path(d, step, 1).exists()
    meta = layout.read_meta(d, STEPS)
    assert (meta["nanod"]["world_size"], meta["nanod"]["optim_ranks"]) == (2, 2)
    assert (meta["device_batch_size"], meta["grad_accum_steps"], meta["total_batch_size"]) == (2, 2, 256)
    assert set(meta["nanod"]["files"]) == {"model_000040.pt", "optim_000040_rank0.pt", "optim_000040_rank1.pt"}
    # rank 1's file holds its RNG only: the optimizer is replicated and saved once, by rank 0
    rank1 = torch.load(layout.optim_path(d, STEPS, 1), weights_only=True)
    assert set(rank1) == {"rank", "rng"} and rank1["rank"] == 1
    lines = [ln for ln in two.out().splitlines() if ln.startswith("step ")]
    assert len(lines) == STEPS, "one step line per step: rank 0's"
    assert two.err().count("base: 2 layers") == 1 and two.err().count("saved checkpoint step 40") == 1
    # the same rows each step as one process: the same losses, up to the order the gradient sums in
    a, b = one.losses(), two.losses()
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a), (a, b)


def test_sigterm_to_every_rank_saves_one_emergency_checkpoint_and_the_resume_is_bitwise_equal(pair):
    root, _, _ = pair
    args = [a for a in ARGS if not a.startswith("--save_every")] + ["--save_every=1000"]
    g = Group(root, 2, *args, tag="stopped")
    g.wait_for_step(5)
    for rank in g.ranks():   # what the keeper does with the daemon's SIGTERM
        rank.send_signal(signal.SIGTERM)
    rc = g.wait()
    assert torchrun.rank_returncode(rc, g.err()) == exitcodes.INTERRUPTED, g.err()[-3000:]
    d = layout.checkpoint_dir(root, "base", "stopped")
    saved = layout.complete_steps(d)
    assert len(saved) == 1 and 6 <= saved[0] < STEPS, saved
    assert layout.optim_path(d, saved[0], 1).exists()
    assert "emergency checkpoint step" in g.err()
    finish(root, 2, *args, "--resume_from_step=auto", tag="stopped")
    assert_bitwise_equal(weights(root, "two"), weights(root, "stopped"))


def test_a_checkpoint_missing_one_ranks_optimizer_file_is_never_resumed_from(pair):
    root, _, _ = pair
    d = copy_checkpoints(root, "two", "torn", [8, 16])
    layout.optim_path(d, 16, 1).unlink()
    assert layout.why_incomplete(d, 16) == "optimizer file of rank 1 missing or empty"
    assert layout.latest_complete(d) == 8
    assert prune_dir(d, keep_last=2, dry_run=True).deleted_steps == []  # retention: step 8 is the newest complete
    g = finish(root, 2, *ARGS, "--resume_from_step=auto", tag="torn")
    assert "skipping checkpoint step 16" in g.err() and "resumed from step 8" in g.err()
    assert_bitwise_equal(weights(root, "two"), weights(root, "torn"))


def test_one_process_resumes_a_two_rank_checkpoint_and_says_the_weights_are_no_longer_bitwise(pair):
    root, _, two = pair
    copy_checkpoints(root, "two", "fewer", [16])
    g = finish(root, 1, *ARGS, "--resume_from_step=auto", tag="fewer")
    assert "resuming step 16 of 2 ranks with 1" in g.err() and "no longer bitwise" in g.err()
    a, b = two.losses(), g.losses()
    assert all(abs(a[k] - b[k]) < 1e-3 for k in b) and min(b) == 16, "the same rows and optimizer state"
    final, ref = weights(root, "fewer"), weights(root, "two")
    assert all(torch.allclose(final[k], ref[k], atol=1e-3) for k in ref)


def test_out_of_memory_on_one_rank_makes_every_rank_exit_oom(pair):
    root, _, _ = pair
    g = Group(root, 2, *ARGS, tag="oom", env={"NANOD_FAULT_OOM_ABOVE": "1", "NANOD_FAULT_RANK": "1"})
    rc = g.wait()
    assert rc == 1, "torchrun's own code says only that a rank failed"
    root_code, others = torchrun.rank_exit_codes(g.err())
    assert root_code == exitcodes.OOM and all(c in (exitcodes.OOM,) for c in others), g.err()[-3000:]
    assert torchrun.rank_returncode(rc, g.err()) == exitcodes.OOM
    assert g.err().count("with device_batch_size=2: retry with a smaller") == 2, "both ranks back off"
    assert "Connection closed" not in g.err()


def test_a_total_batch_the_ranks_cannot_share_is_bad_arguments_naming_the_world_size(pair):
    root, _, _ = pair
    args = [a for a in ARGS if not a.startswith("--total_batch_size")] + ["--total_batch_size=192"]
    g = Group(root, 2, *args, tag="odd")
    rc = g.wait()
    assert torchrun.rank_returncode(rc, g.err()) == exitcodes.BAD_ARGS, g.err()[-3000:]
    assert "total_batch_size 192 is not a multiple of world_size x device_batch_size x max_seq_len = " \
           "2 x 2 x 32 = 128" in g.err()


def test_ranks_die_with_a_torchrun_killed_by_sigkill(pair):
    root, _, _ = pair
    args = [a for a in ARGS if not a.startswith("--num_iterations")] + ["--num_iterations=100000"]
    g = Group(root, 2, *args, tag="orphans")
    g.wait_for_step(1)
    ranks = g.ranks()
    assert len(ranks) == 2
    g.proc.kill()
    g.wait()
    wait_until(lambda: not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks), 10,
               message="the ranks to die with torchrun (PR_SET_PDEATHSIG)")
