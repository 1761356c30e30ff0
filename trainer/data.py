"""Training data: files to documents, documents to token batches, with a resumable position.

Documents come from files in sorted name order, rows in file order, and the
order repeats each epoch; there is no shuffling, so the position is three
small numbers and a resumed run reads exactly the tokens an uninterrupted one
would. base and mid pack documents into one token stream (each document
starts with <|bos|>); row r of that stream is tokens [r*T, r*T+T+1), so the
rows do not depend on device_batch_size and halving it after an OOM feeds the
optimizer the same tokens. sft takes one conversation per row, padded to
max_tokens, loss on assistant tokens only.

Formats: base reads .parquet (a `text` column, as nanochat's shards),
.txt (one document per file) and .jsonl ({"text": ...}); mid and sft read
.jsonl conversations ({"messages": [{"role", "content"}]}). Problems in the
data raise DataError with a one-line reason naming the file (exit BAD_ARGS).
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import torch

from trainer.tokenizer import ChatTokenizer

TEXT_SUFFIXES = (".parquet", ".txt", ".jsonl")
CHAT_SUFFIXES = (".jsonl",)
RENDER_CHUNK = 128  # documents tokenised per call: the Rust tokenizer is fastest in batches


class DataError(Exception):
    """Unusable data; str() is a one-line reason naming the file."""


def list_data_files(path: Path, kind: str) -> list[Path]:
    """The data files under `path` (a file or a directory, searched recursively)."""
    suffixes = TEXT_SUFFIXES if kind == "text" else CHAT_SUFFIXES
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.suffix in suffixes]
    if not files:
        raise DataError(f"no {'/'.join(suffixes)} files in {path}")
    return files


class DocSource:
    """Documents by key (epoch, file, row); keeps one file in memory at a time."""

    def __init__(self, files: list[Path], kind: str):
        self.files, self.kind = files, kind
        self._cached: tuple[int, list] | None = None

    def docs_of(self, i: int) -> list:
        if self._cached is None or self._cached[0] != i:
            self._cached = (i, _read_file(self.files[i], self.kind))
        return self._cached[1]

    def next_key(self, key: tuple[int, int, int]) -> tuple[int, int, int]:
        epoch, f, r = key
        if r + 1 < len(self.docs_of(f)):
            return (epoch, f, r + 1)
        return (epoch, f + 1, 0) if f + 1 < len(self.files) else (epoch + 1, 0, 0)

    def doc(self, key: tuple[int, int, int]):
        docs = self.docs_of(key[1])
        if not docs:  # an empty file: nothing at row 0
            return None
        return docs[key[2]]

    def check(self) -> None:
        """Read the first file now, so a bad path or format fails before training starts."""
        if all(not self.docs_of(i) for i in range(min(len(self.files), 3))) and len(self.files) <= 3:
            raise DataError(f"the data files ({self.files[0]}, ...) hold no documents")


def _read_file(path: Path, kind: str) -> list:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise DataError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
            return [t or "" for t in table.column("text").to_pylist()]
        text = path.read_text(encoding="utf-8")
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except Exception as e:  # pyarrow raises its own types for a torn or foreign file
        raise DataError(f"{path}: cannot read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if path.suffix == ".txt":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{n}: not a JSON object") from None
        field = "text" if kind == "text" else "messages"
        if not isinstance(obj, dict) or field not in obj:
            raise DataError(f"{path}:{n}: expected a JSON object with a {field!r} field")
        if kind == "chat":
            _check_messages(obj["messages"], f"{path}:{n}")
        elif not isinstance(obj["text"], str):
            raise DataError(f"{path}:{n}: 'text' must be a string")
        docs.append(obj[field])
    return docs


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role (system|user|assistant) and a string content")


def render_conversation(tok: ChatTokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and a mask (1 = assistant token the sft loss trains on)."""
    msgs = [dict(m) for m in messages]
    if msgs[0]["role"] == "system" and len(msgs) > 1 and msgs[1]["role"] == "user":
        # no system token in nanochat's vocabulary: fold it into the first user turn
        msgs = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}] + msgs[2:]
    s = tok.special
    ids, mask = [tok.bos], [0]
    for m in msgs:
        content = tok.encode(m["content"])
        if m["role"] == "assistant":
            body = content + [s["<|assistant_end|>"]]
            ids += [s["<|assistant_start|>"]] + body
            mask += [0] + [1] * len(body)
        else:
            ids += [s["<|user_start|>"]] + content + [s["<|user_end|>"]]
            mask += [0] * (len(content) + 2)
    return ids, mask


class StreamLoader:
    """base/mid: documents packed into rows of T+1 tokens; the position is the head document and an offset."""

    def __init__(self, source: DocSource, tok: ChatTokenizer, seq_len: int, state: dict | None = None):
        self.source, self.tok, self.T = source, tok, seq_len
        state = state or {"epoch": 0, "file": 0, "row": 0, "offset": 0}
        self.head_key = (state["epoch"], state["file"], state["row"])
        self.head_offset = state["offset"]
        self.docs: deque[list[int]] = deque()  # rendered documents from head_key on
        self.keys: deque[tuple] = deque()
        self.next_key = self.head_key
        self.available = 0  # tokens in self.docs from the head offset on

    def state_dict(self) -> dict:
        e, f, r = self.head_key
        return {"epoch": e, "file": f, "row": r, "offset": self.head_offset}

    def _render(self, docs: list) -> list[list[int]]:
        if self.source.kind == "text":
            return [[self.tok.bos] + ids for ids in self.tok.encode_batch(docs)]
        return [render_conversation(self.tok, m)[0] for m in docs]

    def _fill(self, need: int) -> None:
        start_epoch = self.next_key[0]
        while self.available < need:
            keys, docs = [], []
            while len(keys) < RENDER_CHUNK:
                doc = self.source.doc(self.next_key)
                if doc is not None:
                    keys.append(self.next_key)
                    docs.append(doc)
                self.next_key = self.source.next_key(self.next_key)
                if self.next_key[1:] == (0, 0):
                    break
            for key, ids in zip(keys, self._render(docs)):
                self.keys.append(key)
                self.docs.append(ids)
                self.available += len(ids) - (self.head_offset if len(self.docs) == 1 else 0)
            if self.next_key[0] > start_epoch + 1 and self.available < need:
                raise DataError(f"the data ({self.source.files[0]}, ...) has fewer than {need} tokens")

    def next_row(self) -> list[int]:
        T = self.T
        self._fill(T + 1)
        row, i, off = [], 0, self.head_offset
        while len(row) < T + 1:
            doc = self.docs[i]
            row += doc[off:off + (T + 1 - len(row))]
            i, off = i + 1, 0
        # advance T tokens: the last target of this row is the first input of the next
        self.available -= T
        left = T
        while left:
            rest = len(self.docs[0]) - self.head_offset
            if rest > left:
                self.head_offset += left
                break
            left -= rest
            self.docs.popleft()
            self.keys.popleft()
            self.head_offset = 0
            self.head_key = self.keys[0] if self.keys else self.next_key
        return row

    def next_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self.next_row() for _ in range(batch)], dtype=torch.long)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class SFTLoader:
    """sft: one conversation per row, padded (or truncated) to max_tokens; targets -1 off the assistant."""

    def __init__(self, source: DocSource, tok: ChatTokenizer, max_tokens: int, state: dict | None = None):
        self.source, self.tok, self.T = source, tok, max_tokens
        state = state or {"epoch": 0, "file": 0, "row": 0}
        self.key = (state["epoch"], state["file"], state["row"])

    def state_dict(self) -> dict:
        e, f, r = self.key
        return {"epoch": e, "file": f, "row": r}

    def _next_doc(self):
        for _ in range(10_000_000):
            doc, key = self.source.doc(self.key), self.key
            self.key = self.source.next_key(self.key)
            if doc is not None:
                return doc
            if key[0] > 1_000:
                break
        raise DataError(f"the data ({self.source.files[0]}, ...) holds no conversations")

    def next_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.T
        inputs = torch.full((batch, T), self.tok.bos, dtype=torch.long)
        targets = torch.full((batch, T), -1, dtype=torch.long)
        for b in range(batch):
            ids, mask = render_conversation(self.tok, self._next_doc())
            ids, mask = ids[:T + 1], mask[:T + 1]
            n = len(ids) - 1
            inputs[b, :n] = torch.tensor(ids[:-1])
            tgt = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])], dtype=torch.long)
            targets[b, :n] = tgt
        return inputs, targets


def count_stream_tokens(source: DocSource, tok: ChatTokenizer) -> int:
    """Tokens in one pass over the data (mid with num_iterations=-1)."""
    loader = StreamLoader(source, tok, 1)
    total, key = 0, (0, 0, 0)
    while key[0] == 0:
        doc = source.doc(key)
        if doc is not None:
            total += len(loader._render([doc])[0])
        key = source.next_key(key)
    return total


def count_documents(source: DocSource) -> int:
    return sum(len(source.docs_of(i)) for i in range(len(source.files)))
