"""Tokens per second of `nanod chat`'s generation on the CPU, with the KV cache and without.

The model has the demo's shape (jobs/examples/tiny-cpu.yaml: depth 2, 128 wide,
64-token rows, the embedded data's 551-token vocabulary), freshly initialised:
speed does not depend on what the weights learned. Each trial prefills a
chat-template prompt and generates a fixed number of tokens (no stop token)
through trainer/generate.py, with the cache (what `nanod chat` runs: one
forward pass a token) and with `--no_cache` (the whole sequence again for each
token), on one thread as the demo job runs. Medians of the trials; the ratio
is measured side by side in this one run. No targets: DESIGN.md sets none.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens generated per trial")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a few tokens, two trials (for the test suite)")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.trials = 16, 2
    import torch

    from trainer import generate
    from trainer.model import GPT, config_for_depth
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    cfg = config_for_depth(2, vocab_size=551, sequence_len=64)
    model = GPT(cfg)
    model.init_weights()
    model.eval()
    loaded = generate.Loaded(model=model, tok=None, phase="sft", step=0, device=torch.device("cpu"))
    prompt = [0, 1] + list(range(20, 36)) + [2, 3]  # <|bos|><|user_start|> 16 tokens <|user_end|><|assistant_start|>

    def trial(use_cache: bool) -> float:
        sampler = generate.Sampler(temperature=0.6, top_k=50, seed=0)
        t0 = time.perf_counter()
        n = sum(1 for _ in generate.generate(loaded, prompt, args.tokens, sampler, use_cache=use_cache))
        return n / (time.perf_counter() - t0)

    trial(True), trial(False)  # warm-up: first calls allocate and pick kernels
    cached, plain, ratios = [], [], []
    for _ in range(args.trials):
        c, p = trial(True), trial(False)
        cached.append(c)
        plain.append(p)
        ratios.append(c / p)
    med_c, med_p, med_r = statistics.median(cached), statistics.median(plain), statistics.median(ratios)
    print(f"demo shape ({cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}), {len(prompt)}-token prompt, "
          f"{args.tokens} tokens a trial, {args.trials} trials, {torch.get_num_threads()} thread(s): "
          f"KV cache {med_c:,.0f} tok/s, no cache {med_p:,.0f} tok/s ({med_r:.1f}x)", file=sys.stderr)
    common = {"unit": "tok/s", "target": None, "tokens": args.tokens, "trials": args.trials}
    print(json.dumps({"name": "chat_tokens_per_sec_cpu", "median": round(med_c, 1), **common}))
    print(json.dumps({"name": "chat_no_cache_tokens_per_sec_cpu", "median": round(med_p, 1), **common}))
    print(json.dumps({"name": "chat_kv_cache_speedup", "median": round(med_r, 2), "unit": "x", "target": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
