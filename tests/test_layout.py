"""Claims about trainer.layout: one definition of a complete checkpoint, shared by resume and retention."""
from __future__ import annotations

import json

from trainer import layout


def write_ckpt(d, step, *, meta=True, model=True, optim=True, meta_text=None):
    d.mkdir(parents=True, exist_ok=True)
    if model:
        layout.model_path(d, step).write_bytes(b"m" * 10)
    if optim:
        layout.optim_path(d, step, 0).write_bytes(b"o" * 10)
    if meta:
        layout.meta_path(d, step).write_text(meta_text if meta_text is not None else json.dumps({"step": step}))


def test_paths_follow_nanochat_layout(tmp_path):
    d = layout.checkpoint_dir(tmp_path, "sft", "d8")
    assert d == tmp_path / "chatsft_checkpoints" / "d8"
    assert layout.model_path(d, 250).name == "model_000250.pt"
    assert layout.meta_path(d, 250).name == "meta_000250.json"
    assert layout.optim_path(d, 250, 0).name == "optim_000250_rank0.pt"


def test_a_checkpoint_without_meta_or_with_a_torn_meta_is_not_complete(tmp_path):
    d = tmp_path / "c"
    write_ckpt(d, 1)
    write_ckpt(d, 2, meta=False)
    write_ckpt(d, 3, meta_text='{"step": ')
    write_ckpt(d, 4, meta_text="[1, 2]")
    assert [layout.is_complete(d, s) for s in (1, 2, 3, 4)] == [True, False, False, False]
    assert layout.latest_complete(d) == 1


def test_missing_or_empty_model_or_optimizer_makes_it_incomplete(tmp_path):
    d = tmp_path / "c"
    write_ckpt(d, 5, optim=False)
    write_ckpt(d, 6)
    layout.model_path(d, 6).write_bytes(b"")
    assert not layout.is_complete(d, 5) and not layout.is_complete(d, 6)
    assert layout.is_complete(d, 5, optim_ranks=0)


def test_meta_says_how_many_optimizer_ranks_to_expect(tmp_path):
    d = tmp_path / "c"
    write_ckpt(d, 7, meta_text=json.dumps({"nanod": {"optim_ranks": 2}}))
    assert not layout.is_complete(d, 7)
    layout.optim_path(d, 7, 1).write_bytes(b"x")
    assert layout.is_complete(d, 7)


def test_temp_files_are_hidden_and_never_count_as_steps(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    tmp = layout.temp_path(layout.model_path(d, 9))
    assert tmp.name.startswith(".") and layout.is_temp(tmp)
    tmp.write_bytes(b"x")
    assert layout.list_steps(d) == []
    write_ckpt(d, 10)
    assert layout.list_steps(d) == [10] and layout.files_of(d, 10) == sorted(
        [layout.meta_path(d, 10), layout.model_path(d, 10), layout.optim_path(d, 10, 0)])
    assert layout.size_of(d, 10) > 0


def test_no_directory_means_no_steps(tmp_path):
    assert layout.list_steps(tmp_path / "missing") == [] and layout.latest_complete(tmp_path / "missing") is None


def test_a_file_whose_size_differs_from_the_meta_makes_it_incomplete(tmp_path):
    d = tmp_path / "c"
    sizes = {"model_000011.pt": 10, "optim_000011_rank0.pt": 10}
    write_ckpt(d, 11, meta_text=json.dumps({"nanod": {"files": sizes}}))
    assert layout.is_complete(d, 11)
    with open(layout.model_path(d, 11), "r+b") as f:
        f.truncate(4)
    assert "truncated" in layout.why_incomplete(d, 11)
    assert layout.latest_complete(d) is None
