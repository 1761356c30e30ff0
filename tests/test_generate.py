"""Claims about trainer/generate.py and the model's KV cache, on one tiny base + sft model (module fixture).

The cache path must give the logits, and so the tokens, of the no-cache path
(the whole sequence through the training forward each time), also across turns
of a chat and past the rotary tables' length; a seed must fix the output.
"""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT
from trainer import exitcodes, generate
from trainer.model import GPT, GPTConfig, KVCache

TAG = "gen"
TRAIN = ["--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=128", "--save_every=-1", f"--model_tag={TAG}"]


def train_tiny(root) -> None:
    """base (4 steps) then sft (3 steps) of a depth-2 model under `root`: what the tests talk to."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOD_")}
    env.update(NANOCHAT_BASE_DIR=str(root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for phase, args in (("base", ["--depth=2", "--num_iterations=4"]), ("sft", ["--num_iterations=3"])):
        flags = [f.replace("max_seq_len", "max_tokens") for f in TRAIN] if phase == "sft" else TRAIN
        r = subprocess.run([PYTHON, "-m", "trainer", phase, *flags, *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nanochat")
    train_tiny(root)
    return root


@pytest.fixture(scope="module")
def base(root):
    return generate.load_model(root, "base", TAG, None, torch.device("cpu"))


@pytest.fixture(scope="module")
def sft(root):
    return generate.load_model(root, "sft", TAG, None, torch.device("cpu"))


def tokens(loaded, ids, n=24, *, seed=None, temperature=0.0, use_cache=True, cache=None):
    sampler = generate.Sampler(temperature=temperature, top_k=50, seed=seed)
    return list(generate.generate(loaded, ids, n, sampler, cache=cache, use_cache=use_cache))


def test_the_same_seed_gives_the_same_text_and_another_seed_other_text(base):
    ids = generate.prompt_ids(base, "The cat")
    a = tokens(base, ids, 32, seed=7, temperature=1.0)
    assert a == tokens(base, ids, 32, seed=7, temperature=1.0)
    assert a != tokens(base, ids, 32, seed=8, temperature=1.0)
    assert len(a) == 32  # base stops only at <|bos|>, which 4 steps have not learned to say often


def test_the_seed_does_not_touch_the_global_rng(base):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    tokens(base, generate.prompt_ids(base, "x"), 4, seed=3, temperature=1.0)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 11)])
@pytest.mark.parametrize("which", ["base", "sft"])
def test_the_kv_cache_gives_the_tokens_of_the_no_cache_path(which, temperature, seed, request):
    loaded = request.getfixturevalue(which)
    ids = generate.prompt_ids(loaded, "Where is the ball?")
    with_cache = tokens(loaded, ids, 24, seed=seed, temperature=temperature)
    assert with_cache == tokens(loaded, ids, 24, seed=seed, temperature=temperature, use_cache=False)


def test_cached_logits_match_the_training_forward_fed_in_chunks_past_a_small_capacity(sft):
    model = sft.model
    seq = torch.tensor([generate.prompt_ids(sft, "one two three four five six seven")])
    cache = KVCache(model.config.n_layer, capacity=4)  # grows twice on the way
    pos = 0
    for chunk in (5, 3, 1, 1, seq.size(1) - 10):
        logits = model.forward_cached(seq[:, pos:pos + chunk], cache)
        pos += chunk
        with torch.no_grad():
            full = model(seq[:, :pos])[:, -1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    assert cache.pos == seq.size(1) and cache.capacity >= seq.size(1)


def test_a_second_chat_turn_fed_through_the_cache_gives_the_tokens_of_the_whole_conversation(sft):
    end, bos = sft.tok.special["<|assistant_end|>"], sft.tok.bos
    cache = KVCache(sft.model.config.n_layer)
    first = generate.prompt_ids(sft, "hello there")
    reply = tokens(sft, first, 6, cache=cache)
    # what ChatSession feeds next: the reply's last token (never in the cache yet), closed by <|assistant_end|>
    said = reply[:-1] if reply[-1] in (end, bos) else reply
    pending = [end] if reply[-1] in (end, bos) else [reply[-1], end]
    turn = generate.prompt_ids(sft, "and then?")[1:]
    cached = tokens(sft, pending + turn, 12, cache=cache)  # several new tokens after cached ones: the masked path
    whole = tokens(sft, first + said + [end] + turn, 12, use_cache=False)
    assert cached == whole


def test_a_chat_session_replies_to_each_turn_and_clear_starts_over(sft):
    session = generate.ChatSession(sft, generate.Sampler(temperature=0.0), max_tokens=8)
    one = "".join(session.reply("hi"))
    "".join(session.reply("and you?"))
    assert session.cache.pos > len(generate.prompt_ids(sft, "hi"))
    session.clear()
    assert session.cache.pos == 0 and "".join(session.reply("hi")) == one


def test_sft_and_mid_get_the_chat_template_and_base_gets_plain_text_after_bos(base, sft):
    s = sft.tok.special
    ids = generate.prompt_ids(sft, "What is 2+2?")
    assert ids[:2] == [s["<|bos|>"], s["<|user_start|>"]]
    assert ids[-2:] == [s["<|user_end|>"], s["<|assistant_start|>"]]
    assert generate.stop_ids(sft) == {s["<|assistant_end|>"], s["<|bos|>"]}
    plain = generate.prompt_ids(base, "What is 2+2?")
    assert plain == [s["<|bos|>"]] + base.tok.encode("What is 2+2?")
    assert not set(plain[1:]) & set(s.values())
    mid = generate.Loaded(model=sft.model, tok=sft.tok, phase="mid", step=1, device=sft.device)
    assert generate.prompt_ids(mid, "What is 2+2?") == ids


def test_the_cache_runs_past_the_rotary_tables_of_the_training_length():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=2, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    model.init_weights()
    assert model.cos.size(1) == 20
    seq = torch.randint(0, 64, (1, 30))
    cache = KVCache(1)
    model.forward_cached(seq[:, :18], cache)
    logits = model.forward_cached(seq[:, 18:], cache)  # positions 18..29: past the 20 the tables had
    assert model.cos.size(1) >= 30
    with torch.no_grad():
        torch.testing.assert_close(logits, model(seq)[:, -1], rtol=1e-4, atol=1e-4)


def run_trainer(root, *args):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([PYTHON, "-m", "trainer", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_python_m_trainer_sample_prints_a_completion_and_refuses_bad_flags_in_one_line(root):
    r = run_trainer(root, "sample", f"--model_tag={TAG}", "--phase=base", "--prompt=The", "--seed=1",
                    "--max_tokens=6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The") and len(r.stdout.strip()) > 3
    assert "base step 4, cpu: plain text" in r.stderr
    bad_flags = [(["--temperature=-1"], "--temperature"), (["--model_tag=nope"], "no complete checkpoint"),
                 (["--top_k=-1"], "--top_k")]
    if not torch.cuda.is_available():
        bad_flags.append((["--device=cuda"], "no CUDA device"))
    for bad, words in bad_flags:
        r = run_trainer(root, "sample", f"--model_tag={TAG}", *bad)
        assert r.returncode == exitcodes.BAD_ARGS and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_cache_under_bfloat16_follows_the_training_forward(root):
    loaded = generate.load_model(root, "sft", TAG, None, torch.device("cuda"))
    seq = torch.tensor([generate.prompt_ids(loaded, "one two three four")], device="cuda")
    cache = KVCache(loaded.model.config.n_layer)
    with loaded.autocast():
        loaded.model.forward_cached(seq[:, :-3], cache)
        logits = loaded.model.forward_cached(seq[:, -3:], cache)
        with torch.no_grad():
            full = loaded.model(seq)[:, -1]
    assert cache.pos == seq.size(1) and cache.k[0].device.type == "cuda"
    torch.testing.assert_close(logits, full.float(), rtol=0.05, atol=0.05)
    out = tokens(loaded, generate.prompt_ids(loaded, "hi"), 8, seed=1, temperature=1.0)
    assert len(out) >= 1 and all(0 <= t < loaded.tok.vocab_size for t in out)
