"""The GPT: nanochat's architecture choices, written for nanod.

Rotary position embeddings, QK-norm, ReLU^2 MLP, untied token embedding and
head, parameter-free RMSNorm, tanh logit softcap, no biases. The shape comes
from depth alone (width = depth x aspect_ratio, rounded up to whole heads),
as nanochat sizes its models. This module knows nothing of optimizers,
checkpoints or data.

Generation (trainer/generate.py) runs the same blocks with a KVCache: each
layer's keys and values of the tokens seen so far, so that a new token costs
one forward pass over itself rather than over the whole conversation. The
training forward never sees a cache and is unchanged by it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.kernels import SoftcappedCrossEntropy, linear


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    def to_dict(self) -> dict:
        return asdict(self)


def config_for_depth(depth: int, *, vocab_size: int, sequence_len: int, aspect_ratio: int = 64,
                     head_dim: int = 128) -> GPTConfig:
    """nanochat's sizing: width = depth x aspect_ratio rounded up to a multiple of head_dim."""
    width = depth * aspect_ratio
    width = ((width + head_dim - 1) // head_dim) * head_dim
    heads = width // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=heads, n_kv_head=heads, n_embd=width)


def norm(x: torch.Tensor) -> torch.Tensor:
    # RMSNorm without a learnable gain: one fewer thing to optimise, as nanochat found
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """nn.Linear without a bias, its product through trainer.kernels.linear (the CPU fast path); same state dict."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Every layer's keys and values for positions [0, pos), as (B, n_kv_head, capacity, head_dim) buffers.

    Allocated on the first write with the keys' dtype and device (whatever
    autocast made them); capacity doubles when a conversation outgrows it. `clear` forgets
    the conversation without freeing memory.
    """

    def __init__(self, n_layer: int, capacity: int = 256):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.capacity = capacity
        self.pos = 0

    def clear(self) -> None:
        self.pos = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at [pos, pos+T) of `layer`; the keys and values of [0, pos+T)."""
        end = self.pos + k.size(2)
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or buf_k.size(2) < end:
            size = max(self.capacity, end)
            while size < end:
                size *= 2
            self.capacity = max(self.capacity, size)
            new_k = k.new_empty(k.size(0), k.size(1), self.capacity, k.size(3))
            new_v = v.new_empty(v.size(0), v.size(1), self.capacity, v.size(3))
            if buf_k is not None:
                new_k[:, :, :self.pos] = buf_k[:, :, :self.pos]
                new_v[:, :, :self.pos] = buf_v[:, :, :self.pos]
            self.k[layer], self.v[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, self.pos:end] = k
        buf_v[:, :, self.pos:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.c_q = Linear(cfg.n_embd, cfg.n_head * self.head_dim)
        self.c_k = Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim)
        self.c_v = Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # rotary then QK-norm: keeps attention logits bounded without a softmax temperature
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.n_head != self.n_kv_head
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = _attend_cached(q, k, v, cache, layer, gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


def _attend_cached(q, k, v, cache: KVCache, layer: int, gqa: bool) -> torch.Tensor:
    """The new queries against the cached keys plus the new ones: query i sits at position pos + i."""
    pos, T = cache.pos, q.size(2)
    keys, values = cache.append(layer, k, v)
    if T == 1:  # one new token sees everything before it: no mask
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
    if pos == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
    # several new tokens after earlier ones (a chat's next turn): SDPA's is_causal aligns top-left, not here
    mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(diagonal=pos)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(norm(x), cos, sin, cache, layer)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    SOFTCAP = 15.0  # tanh logit cap: stops runaway logits early in training

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size)
        # rotary tables are derived, not learned: kept out of the state dict;
        # 10x the training length so sft/inference may run a little longer
        cos, sin = self._rotary_tables(cfg.sequence_len * 10, cfg.n_embd // cfg.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary_tables(length: int, head_dim: int, base: float = 10000.0):
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.normal_(lin.weight, std=1.0 / math.sqrt(cfg.n_embd))
            # residual outputs start at zero: each block begins as the identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, fused: bool = False) -> torch.Tensor:
        """Logits (float32, softcapped) for token ids of shape (B, T); with targets, the loss instead.

        The loss is the cross-entropy summed over the targets that are not -1 (0-d, float32), as
        nanochat's forward(idx, targets) gives it, so that a wrapper (torch.compile, DDP) sees one
        call. fused=True (eager training on the CPU) gets the same value and gradients from
        trainer.kernels.SoftcappedCrossEntropy without ever holding the (B*T, vocab) logits.
        """
        h = self.hidden(idx)
        if targets is not None and fused:
            return SoftcappedCrossEntropy.apply(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.SOFTCAP)
        logits = self.lm_head(h).float()
        logits = self.SOFTCAP * torch.tanh(logits / self.SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum")

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The normed last hidden state (B, T, n_embd), what lm_head reads."""
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        return norm(x)

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab, float32, softcapped) of the last of `idx`'s tokens, which follow the cache's.

        The tokens are at positions cache.pos .. cache.pos + T - 1; their keys and
        values join the cache, whose pos moves on by T. Only the last position goes
        through lm_head: that is all a sampler needs.
        """
        T, pos = idx.size(1), cache.pos
        self._cover_positions(pos + T)
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        x = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        cache.pos = pos + T
        logits = self.lm_head(norm(x[:, -1])).float()
        return self.SOFTCAP * torch.tanh(logits / self.SOFTCAP)

    def _cover_positions(self, length: int) -> None:
        """Rotary tables at least `length` long: a long chat may pass the 10x of the training length."""
        if self.cos.size(1) >= length:
            return
        cos, sin = self._rotary_tables(max(length, 2 * self.cos.size(1)), self.config.n_embd // self.config.n_head)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

