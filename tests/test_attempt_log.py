"""Claims about why an attempt ended, as read from the tail of its log (daemon/attempt_log.py)."""
from __future__ import annotations

import pytest

from daemon.attempt_log import last_error_line, strip_ansi

INFO = "2026-12-01 20:17:41,072 - nanochat.checkpoint_manager - \x1b[32m\x1b[1mINFO\x1b[0m - Saved metadata to: /x"
STEP = "step 00002/00006 (33.33%) | loss: 8.316155 | lrm: 0.07 | dt: 4506.99ms"
TRACEBACK = ("Traceback (most recent call last):\n"
             '  File "/x/scripts/chat_sft.py", line 450, in <module>\n'
             "    optimizer.step()\n"
             "    ^^^^^^^^^^^^^^^^\n")


def test_a_kill_from_outside_names_no_error_not_the_info_line_it_was_printing():
    for signum in (9, 15, 2, 1):
        assert last_error_line(f"{STEP}\n{INFO}\n", -signum) == ""


def test_the_exception_line_of_the_last_traceback_is_the_error():
    tail = (f"{TRACEBACK}ValueError: first\n\nDuring handling of the above exception, another exception occurred:\n\n"
            f"{TRACEBACK}RuntimeError: torch.compile with fullgraph=True found no compiled frames. Skipped frames:\n"
            f"  - __rsub__ (torch/_tensor.py:1106): frame is in the Dynamo skipfiles list\n{INFO}\n")
    assert last_error_line(tail, 1) == \
        "RuntimeError: torch.compile with fullgraph=True found no compiled frames. Skipped frames:"


def test_an_out_of_memory_text_wins_even_without_a_traceback_and_under_a_signal():
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB."
    assert last_error_line(f"{STEP}\n  {oom}\n{INFO}\n", -9) == oom
    assert last_error_line(f"{TRACEBACK}{oom}\n", 1) == oom


def test_an_argument_error_is_the_error():
    tail = "usage: base_train.py [-h] [--run RUN]\nbase_train.py: error: unrecognized arguments: --x=1\n"
    assert last_error_line(tail, 2) == "base_train.py: error: unrecognized arguments: --x=1"


def test_without_a_traceback_the_last_line_that_is_not_chatter_is_the_error():
    tail = f"terminate called after throwing an instance of 'c10::Error'\n  what():  boom\n{INFO}\n{STEP}\n"
    assert last_error_line(tail, -6) == "what():  boom"   # SIGABRT: the process died of its own error
    assert last_error_line("# nanod: job x, phase base, attempt 1: python -m x\n", 1) == ""


@pytest.mark.parametrize("text", ["\x1b[31mRuntimeError: boom\x1b[0m", "\x1b[1;31mRuntimeError: boom\x1b[K"])
def test_colour_codes_never_reach_the_error(text):
    assert last_error_line(f"{TRACEBACK}{text}\n", 1) == "RuntimeError: boom"
    assert strip_ansi(INFO) == "2026-12-01 20:17:41,072 - nanochat.checkpoint_manager - INFO - Saved metadata to: /x"
