"""`nanod chat NAME`: an interactive chat with the job's newest final checkpoint (built-in trainer).

The same checkpoint, devices, GPU lock and nanochat refusal as `nanod sample`
(sample.py owns them); this execs `python -m trainer chat ...`
(trainer/generate.py), which keeps a KV cache across turns so a reply costs one
forward pass a token. The trainer inherits the terminal: "/clear" starts a new
conversation, Ctrl-D or Ctrl-C ends it.
"""
from __future__ import annotations

NAME = "chat"
HELP = "chat with the job's newest final checkpoint (KV cache, CPU or GPU; /clear, Ctrl-D ends)"


def add_arguments(parser) -> None:
    from daemon.commands.sample import add_generation_arguments
    parser.add_argument("name", metavar="NAME", help="the job")
    add_generation_arguments(parser, max_tokens=256)


def run(args, settings) -> int:
    from daemon.commands.sample import exec_trainer
    return exec_trainer("chat", args, settings, [])
