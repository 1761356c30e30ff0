"""The BPE tokenizer: trained once on the base data, kept under NANOCHAT_BASE_DIR.

Byte-level BPE with HF `tokenizers` because its trainer is Rust (a few seconds
on a few hundred MB of text), works offline and gives the same merges for the
same text, so a run can be repeated from scratch. Byte-level means any UTF-8
input encodes without unknown tokens. Text is split first with a GPT-4 style
pattern (numbers in runs of at most two digits, as nanochat does), then bytes
are merged. nanochat's chat special tokens come first, ids 0..8.

The file is $NANOCHAT_BASE_DIR/tokenizer/tokenizer.json; an existing one is
reused as is, so every phase of a model (and every resume) reads the same
vocabulary. This module does not render conversations (data.py does).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
FILE_NAME = "tokenizer.json"


def tokenizer_path(root: Path) -> Path:
    return Path(root) / "tokenizer" / FILE_NAME


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Atomic: a second trainer starting at the same time reads a whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


class ChatTokenizer:
    """Encode/decode plus the special-token ids the loaders need."""

    def __init__(self, tok: Tokenizer):
        # "<|bos|>" typed in a document is text, not a control token: only the
        # loaders insert special ids, so data cannot forge a turn boundary
        tok.encode_special_tokens = True
        self.tok = tok
        self.special = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
        missing = [n for n, i in self.special.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the chat special tokens {', '.join(missing)}")
        self.bos = self.special["<|bos|>"]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)
