"""Talking to a trained model: `python -m trainer sample ...` and `python -m trainer chat ...`.

Loads one complete checkpoint (trainer/layout.py, trainer/checkpoint.py:
weights_only=True only), its shape from the meta and the tokenizer of its
NANOCHAT_BASE_DIR, and generates with a KVCache (trainer/model.py), so a new
token costs one forward pass over that token. A mid or sft model gets the chat
template the sft loader trains on (data.render_conversation, then
<|assistant_start|>) and its reply ends at <|assistant_end|>; a base model
continues plain text after <|bos|> and stops at the next <|bos|>.

Sampling: temperature (0 = greedy), top-k, and a seed that fixes the output
through its own torch.Generator (the global RNG is left alone). `--no_cache`
runs the whole sequence through the model for every token instead: the
reference the cache is tested and benchmarked against.

The chat keeps one cache across turns; a turn feeds only its new tokens.
"/clear" starts a new conversation; EOF, Ctrl-D and Ctrl-C end it. Errors are
one line on stderr and exit BAD_ARGS. This module does not choose a checkpoint
for a job (the daemon's `nanod sample`/`nanod chat` do) and never trains.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from trainer import exitcodes, layout
from trainer.model import GPT, KVCache
from trainer.tokenizer import ChatTokenizer

CHAT_PHASES = ("mid", "sft")  # trained on conversations: they get the chat template


@dataclass
class Loaded:
    model: GPT
    tok: ChatTokenizer
    phase: str
    step: int
    device: torch.device

    @property
    def chat(self) -> bool:
        return self.phase in CHAT_PHASES

    def autocast(self):
        # the trainer's default dtype on a GPU; the CPU runs float32 as it trains
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


class GenerateError(Exception):
    """A checkpoint, tokenizer or flag that cannot be used; str() is one line."""


# ---------------------------------------------------------------- loading

def load_model(root: Path, phase: str, model_tag: str, step: int | None, device: torch.device) -> Loaded:
    """The model of one complete checkpoint (the newest when step is None) and its tokenizer."""
    from trainer.checkpoint import load_checkpoint
    from trainer.setup import _config_of
    from trainer.tokenizer import load_tokenizer, tokenizer_path
    ckpt_dir = layout.checkpoint_dir(root, phase, model_tag)
    if step is None:
        step = layout.latest_complete(ckpt_dir)
        if step is None:
            raise GenerateError(f"no complete checkpoint in {ckpt_dir}")
    try:
        state, _, meta = load_checkpoint(ckpt_dir, step, "cpu", with_optim=False)
        cfg = _config_of(meta)
    except Exception as e:  # ValueError (unusable file), BadArgs (no model_config)
        raise GenerateError(str(e)) from None
    path = tokenizer_path(root)
    try:
        tok = ChatTokenizer(load_tokenizer(path))
    except Exception as e:
        raise GenerateError(f"tokenizer {path} is unusable: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if tok.vocab_size != cfg.vocab_size:
        raise GenerateError(f"the tokenizer {path} has {tok.vocab_size} tokens but the model has {cfg.vocab_size}")
    model = GPT(cfg)
    model.load_state_dict(state)
    return Loaded(model=model.to(device).eval(), tok=tok, phase=phase, step=step, device=device)


def prompt_ids(loaded: Loaded, text: str) -> list[int]:
    """What the model reads before it answers `text`: the chat template for mid/sft, else <|bos|> + text."""
    tok = loaded.tok
    if loaded.chat:
        from trainer.data import render_conversation
        ids, _ = render_conversation(tok, [{"role": "user", "content": text}])
        return ids + [tok.special["<|assistant_start|>"]]
    return [tok.bos] + tok.encode(text)


def stop_ids(loaded: Loaded) -> set[int]:
    s = loaded.tok.special
    return {s["<|assistant_end|>"], s["<|bos|>"]} if loaded.chat else {s["<|bos|>"]}


# ---------------------------------------------------------------- sampling

class Sampler:
    """The next token from a row of logits: greedy at temperature 0, else top-k then a seeded draw."""

    def __init__(self, temperature: float = 0.6, top_k: int | None = 50, seed: int | None = None,
                 device: torch.device | str = "cpu"):
        self.temperature, self.top_k = temperature, top_k
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def next(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) float32."""
        if self.temperature == 0:
            return int(logits.argmax())
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.size(-1):
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def generate(loaded: Loaded, ids: list[int], max_tokens: int, sampler: Sampler, *, stop: set[int] = frozenset(),
             cache: KVCache | None = None, use_cache: bool = True) -> Iterator[int]:
    """Tokens after `ids`, one at a time, up to max_tokens or a stop token (yielded too, then the end).

    With a cache, `ids` are the tokens that follow what it holds already (all of
    them for a fresh cache): they go through the model once, then each new token
    once. The last token yielded is not in the cache yet: the next call passes it
    on. use_cache=False reruns the whole sequence for each token (the reference).
    """
    model = loaded.model
    if not use_cache:
        seq = list(ids)
        for _ in range(max_tokens):
            with loaded.autocast(), torch.no_grad():
                logits = model(torch.tensor([seq], device=loaded.device))[0, -1].float()
            token = sampler.next(logits)
            yield token
            if token in stop:
                return
            seq.append(token)
        return
    cache = cache if cache is not None else KVCache(model.config.n_layer)
    feed = list(ids)
    for _ in range(max_tokens):
        with loaded.autocast():
            logits = model.forward_cached(torch.tensor([feed], device=loaded.device), cache)[0]
        token = sampler.next(logits)
        yield token
        if token in stop:
            return
        feed = [token]


# ---------------------------------------------------------------- the chat

class ChatSession:
    """One conversation: a KV cache and the tokens not in it yet; each turn costs its new tokens only."""

    def __init__(self, loaded: Loaded, sampler: Sampler, max_tokens: int):
        self.loaded, self.sampler, self.max_tokens = loaded, sampler, max_tokens
        self.cache = KVCache(loaded.model.config.n_layer)
        self.clear()

    def clear(self) -> None:
        self.cache.clear()
        self.pending = [self.loaded.tok.bos]

    def reply(self, text: str) -> Iterator[str]:
        """The reply to `text`, as pieces of text while it is generated."""
        tok = self.loaded.tok
        new = prompt_ids(self.loaded, text)[1:]  # the session's own <|bos|> is pending or in the cache
        feed, out, shown = self.pending + new, [], ""
        end = tok.special["<|assistant_end|>"] if self.loaded.chat else tok.bos
        last = None
        for last in generate(self.loaded, feed, self.max_tokens, self.sampler, stop=stop_ids(self.loaded),
                             cache=self.cache):
            if last in stop_ids(self.loaded):
                break
            out.append(last)
            text_now = tok.decode(out)
            if not text_now.endswith("\ufffd"):  # a multi-byte character still being spelled
                yield text_now[len(shown):]
                shown = text_now
        if tok.decode(out) != shown:
            yield tok.decode(out)[len(shown):]
        if last is not None and last not in stop_ids(self.loaded):
            # cut off by max_tokens: the last token is not in the cache yet, and for a chat the
            # template goes on after <|assistant_end|> however the reply ended
            self.pending = [last, end] if self.loaded.chat else [last]
        else:
            self.pending = [end]


# ---------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit BAD_ARGS, not argparse's usage block
        raise GenerateError(message)


def build_parser(command: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m trainer {command}", description=(
        "print a completion from a checkpoint" if command == "sample" else
        "chat with a checkpoint (a KV cache across turns; /clear starts over; Ctrl-D ends)"))
    p.add_argument("--phase", choices=list(layout.PHASE_DIRS), default="sft", help="which phase's checkpoint")
    p.add_argument("--model_tag", "--model-tag", required=True, help="the model tag (checkpoint directory)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete)")
    if command == "sample":
        p.add_argument("--prompt", default="", help="text to continue or answer (default: none)")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=128 if command == "sample" else 256,
                   help="most tokens to generate (per reply in a chat)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    p.add_argument("--top_k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="fixes the output (default: a fresh one)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--no_cache", "--no-cache", action="store_true", help="no KV cache (for comparison)")
    return p


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    parser = build_parser(command)
    try:
        args = parser.parse_args(rest)
        check_args(args)
        device = _device(args.device)
        loaded = load_model(layout.base_dir(), args.phase, args.model_tag, args.step, device)
        sampler = Sampler(args.temperature, args.top_k or None, args.seed, device)
        if command == "sample":
            return run_sample(loaded, args, sampler)
        return run_chat(loaded, args, sampler)
    except GenerateError as e:
        print(f"trainer {command}: error: {e}", file=sys.stderr, flush=True)
        return exitcodes.BAD_ARGS
    except KeyboardInterrupt:  # Ctrl-C ends a chat (or a long sample) as EOF does
        print(flush=True)
        return exitcodes.OK


def check_args(args) -> None:
    if args.max_tokens < 1:
        raise GenerateError(f"--max_tokens must be at least 1, got {args.max_tokens}")
    if not 0 <= args.temperature <= 100 or args.temperature != args.temperature:
        raise GenerateError(f"--temperature must be between 0 and 100, got {args.temperature}")
    if args.top_k < 0:
        raise GenerateError(f"--top_k must be 0 (all) or more, got {args.top_k}")
    if args.step is not None and args.step < 0:
        raise GenerateError(f"--step must be a step number, got {args.step}")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA device is available to this torch")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_sample(loaded: Loaded, args, sampler: Sampler) -> int:
    tok = loaded.tok
    ids = prompt_ids(loaded, args.prompt)
    stop = stop_ids(loaded)
    print(f"{loaded.phase} step {loaded.step}, {loaded.device.type}: "
          f"{'chat template' if loaded.chat else 'plain text'}", file=sys.stderr, flush=True)
    out = [t for t in generate(loaded, ids, args.max_tokens, sampler, stop=stop, use_cache=not args.no_cache)
           if t not in stop]
    if loaded.chat:
        print(tok.decode(out), flush=True)
    else:
        print(args.prompt + tok.decode(out), flush=True)
    return exitcodes.OK


def run_chat(loaded: Loaded, args, sampler: Sampler) -> int:
    session = ChatSession(loaded, sampler, args.max_tokens)
    tty = sys.stdin.isatty()
    print(f"chat with {args.model_tag} ({loaded.phase} step {loaded.step}) on {loaded.device.type}; "
          f"/clear starts over, Ctrl-D ends", file=sys.stderr, flush=True)
    if not loaded.chat:
        print(f"note: a {loaded.phase} model was not trained on conversations: it continues your text",
              file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you: ") if tty else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line:  # EOF (input() raises it on a tty; readline gives "")
            if tty:
                print(flush=True)
            return exitcodes.OK
        line = line.rstrip("\n")
        if line.strip() == "/clear":
            session.clear()
            print("(new conversation)", flush=True)
            continue
        if not line.strip():
            continue
        print("assistant: ", end="", flush=True)
        for piece in session.reply(line):
            print(piece, end="", flush=True)
        print(flush=True)
