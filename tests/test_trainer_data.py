"""Claims about the trainer's data path: deterministic rows, resumable positions, sft masks."""
from __future__ import annotations

import json

import pytest

from trainer.data import DataError, DocSource, SFTLoader, StreamLoader, list_data_files, render_conversation
from trainer.embedded import ensure_embedded_data, generate_conversations, generate_documents
from trainer.tokenizer import ChatTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer(train_tokenizer(generate_documents(200), 400))


def text_source(tmp_path, docs):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return DocSource(list_data_files(f, "text"), "text")


def test_embedded_data_is_the_same_bytes_every_time(tmp_path):
    a = ensure_embedded_data(tmp_path / "a")
    b = ensure_embedded_data(tmp_path / "b")
    for rel in ("base/shard_00000.parquet", "chat/conversations.jsonl"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert generate_conversations(3) == generate_conversations(3)


def test_rows_do_not_depend_on_device_batch_size(tmp_path, tok):
    src = text_source(tmp_path, generate_documents(50))
    whole = StreamLoader(src, tok, 16).next_batch(8)[0]
    halves = StreamLoader(src, tok, 16)
    first, second = halves.next_batch(4)[0], halves.next_batch(4)[0]
    assert whole[:4].equal(first) and whole[4:].equal(second)


def test_a_loader_resumed_from_its_state_reads_the_same_rows(tmp_path, tok):
    src = text_source(tmp_path, generate_documents(30))
    a = StreamLoader(src, tok, 24)
    for _ in range(7):
        a.next_batch(3)
    b = StreamLoader(src, tok, 24, json.loads(json.dumps(a.state_dict())))
    for _ in range(40):  # past the end of the data: epochs wrap the same way
        x, y = a.next_batch(3)
        x2, y2 = b.next_batch(3)
        assert x.equal(x2) and y.equal(y2)


def test_sft_trains_only_on_assistant_tokens_and_pads_to_max_tokens(tmp_path, tok):
    f = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}]
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    ids, mask = render_conversation(tok, msgs)
    answer = tok.encode("4.") + [tok.special["<|assistant_end|>"]]
    assert [i for i, m in zip(ids, mask) if m] == answer
    x, y = SFTLoader(DocSource([f], "chat"), tok, 40).next_batch(2)
    assert x.shape == y.shape == (2, 40)
    assert [t for t in y[0].tolist() if t != -1] == answer


def test_special_token_text_in_data_stays_text(tok):
    assert tok.bos not in tok.encode("a <|bos|> b")


def test_malformed_conversations_name_the_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + '{"messages": [{"role": "bot"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        DocSource([f], "chat").docs_of(0)
