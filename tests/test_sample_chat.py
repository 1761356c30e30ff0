"""`nanod sample` and `nanod chat` as a user meets them: real subprocesses against one tiny trained job.

The module fixture trains base then sft with the real trainer under a
checkpoint root and writes the job's record (as the daemon leaves it when the
job is done) in a home; the commands find the sft final checkpoint from it and
exec the trainer's generator.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_generate import TAG, train_tiny

NANOD = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]


def write_record(home, name, *, spec, state="done", phase_index=2, finals=None) -> None:
    jobs = home / "state" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    rec = {"schema": 1, "name": name, "seq": 1, "state": state, "state_since": time.time(), "spec": spec,
           "phase_index": phase_index, "phase_final_steps": finals or {}}
    (jobs / f"{name}.json").write_text(json.dumps(rec))


def builtin_spec(name):
    return {"name": name, "model_tag": TAG, "runner": "builtin", "env": {"OMP_NUM_THREADS": "1"},
            "phases": [{"phase": "base", "args": {"depth": 2}}, {"phase": "sft", "args": {}}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    top = tmp_path_factory.mktemp("sample")
    root, home = top / "nanochat", top / "home"
    train_tiny(root)
    write_record(home, "tiny", spec=builtin_spec("tiny"), finals={"base": 4, "sft": 3})
    write_record(home, "young", spec=builtin_spec("young"), state="running", phase_index=0)
    return {"root": root, "home": home, "locks": top / "locks"}


def nanod(world, *args, stdin=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(NANOD_LOCK_DIR=str(world["locks"]), NANOD_NANOCHAT_BASE_DIR=str(world["root"]))
    return subprocess.run([*NANOD, "--home", str(world["home"]), *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_sample_prints_a_completion_from_the_newest_final_checkpoint_of_the_last_phase(world):
    a = nanod(world, "sample", "tiny", "--prompt", "Where is the ball?", "--seed", "5", "--max-tokens", "8")
    assert a.returncode == 0, a.stderr
    assert "sft step 3, cpu: chat template" in a.stderr and a.stdout.strip()
    b = nanod(world, "sample", "tiny", "--prompt", "Where is the ball?", "--seed", "5", "--max-tokens", "8")
    assert b.stdout == a.stdout  # the seed goes through to the trainer


def test_chat_answers_each_of_two_turns_and_ends_cleanly_at_eof(world):
    r = nanod(world, "chat", "tiny", "--seed", "1", "--max-tokens", "6", stdin="hello\nwhat now?\n")
    assert r.returncode == 0, r.stderr
    replies = [ln for ln in r.stdout.splitlines() if ln.startswith("assistant: ")]
    assert len(replies) == 2, r.stdout
    assert f"chat with {TAG} (sft step 3) on cpu" in r.stderr and "Traceback" not in r.stderr


def test_a_held_gpu_lock_sends_the_chat_to_the_cpu_in_one_line(world):
    from daemon.gpu import lock as gpulock
    fd = gpulock.acquire(world["locks"] / "gpu0.lock", timeout=5)
    try:
        gpulock.write_holder(world["locks"] / "gpu0.lock", pid=os.getpid(), command="a training", job="other")
        r = nanod(world, "chat", "tiny", "--max-tokens", "2", stdin="hi\n")
    finally:
        gpulock.release(fd)
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "running on the CPU" in ln]
    assert len(notes) == 1 and "GPU 0 is in use" in notes[0] and "job other" in notes[0], r.stderr


def test_an_unknown_job_a_bad_name_and_bad_flags_are_one_line_and_exit_2(world):
    one_line_error(nanod(world, "sample", "nobody"), "no job named 'nobody'")
    one_line_error(nanod(world, "chat", "../tiny"), "is not a job name")
    one_line_error(nanod(world, "sample", "tiny", "--temperature", "-1"), "--temperature")
    one_line_error(nanod(world, "sample", "tiny", "--max-tokens", "0"), "--max-tokens")


def test_a_job_without_a_final_checkpoint_says_which_phase_runs_and_what_is_there(world):
    one_line_error(nanod(world, "chat", "young"), "job young has no final checkpoint yet", "running in phase base",
                   "newest checkpoint is step 4")


def test_a_nanochat_job_is_pointed_to_nanochats_chat_cli_and_exits_non_zero(world):
    repo = "/work/shared/nanochat/guide-era"
    spec = {"name": "nc", "model_tag": "d8", "runner": "nanochat", "nanochat": {"repo": repo, "python": sys.executable},
            "phases": [{"phase": "base", "args": {}}, {"phase": "mid", "args": {}}, {"phase": "sft", "args": {}}]}
    write_record(world["home"], "nc", spec=spec, finals={"base": 10, "mid": 5, "sft": 2})
    for command in ("sample", "chat"):
        r = nanod(world, command, "nc", "--prompt=hi" if command == "sample" else "--seed=1")
        assert r.returncode == 1, r.stderr
        assert "-m scripts.chat_cli -i sft -g d8 -s 2" in r.stdout and f"cd {repo}" in r.stdout, r.stdout
        assert ("-p hi" in r.stdout) == (command == "sample")
        assert "-m scripts.chat_web -i sft -g d8" in r.stdout  # guide-era has the web UI, head does not


def test_the_command_modules_import_without_torch():
    code = "import sys, daemon.commands.sample, daemon.commands.chat; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_the_demos_closing_sample_prints_the_question_and_the_models_answer(world, capsys):
    from daemon import demo
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(NANOD_LOCK_DIR=str(world["locks"]), NANOCHAT_BASE_DIR=str(world["root"]))
    demo._sample([sys.executable, "-m", "daemon.cli", "--home", str(world["home"])], env, "tiny")
    out = capsys.readouterr().out
    assert f"user:      {demo.SAMPLE_PROMPT}" in out and "\n  assistant: " in out and "failed" not in out, out


def test_chat_with_lock_holds_the_jobs_gpu_lock_for_exactly_as_long_as_it_runs(world):
    from daemon.gpu import lock as gpulock
    from conftest import wait_until
    path = world["locks"] / "gpu0.lock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(NANOD_LOCK_DIR=str(world["locks"]), NANOD_NANOCHAT_BASE_DIR=str(world["root"]))
    proc = subprocess.Popen([*NANOD, "--home", str(world["home"]), "chat", "tiny", "--lock", "--device", "cpu",
                             "--max-tokens", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        wait_until(lambda: gpulock.is_held(path), 30, message="the chat to take the GPU lock")
        out, err = proc.communicate("hi\n", timeout=60)  # the reply, then EOF
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out.count("assistant: ") == 1 and not gpulock.is_held(path)
    assert (gpulock.read_holder(path) or {}).get("command") == "nanod chat tiny"


def test_chat_on_a_terminal_prompts_each_turn_and_ends_at_ctrl_d(world):
    import pty
    import select
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(NANOD_LOCK_DIR=str(world["locks"]), NANOD_NANOCHAT_BASE_DIR=str(world["root"]))
    pid, fd = pty.fork()
    if pid == 0:  # the child: nanod chat on the terminal, as a user starts it
        os.chdir(ROOT)
        os.execve(NANOD[0], [*NANOD, "--home", str(world["home"]), "chat", "tiny", "--max-tokens", "4"], env)
    seen, deadline, sent = b"", time.monotonic() + 60, 0
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child is gone: the terminal closed
                    break
                if not chunk:
                    break
                seen += chunk
            if seen.count(b"you: ") > sent:
                sent += 1
                os.write(fd, b"hello\n" if sent < 3 else b"\x04")  # two turns, then Ctrl-D
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen.decode(errors="replace")
    assert seen.count(b"you: ") == 3 and seen.count(b"assistant: ") == 2, seen.decode(errors="replace")
