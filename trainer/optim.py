"""Muon for the block matrices, AdamW for the embedding and the head.

Muon (momentum, then orthogonalise the update with a Newton-Schulz iteration)
trains the square-ish matrices of a transformer faster than Adam; embeddings
and the output head are not matrices in that sense and keep AdamW, as
nanochat does. Single process only: no sharding across ranks. On the CPU the
Newton-Schulz runs in float32 so that the same inputs give the same bits
(exact resume); on CUDA it runs in bfloat16 for speed. Schedules live in
train.py; this module only steps.
"""
from __future__ import annotations

import math

import torch

from trainer.kernels import matmul_nt

# quintic Newton-Schulz coefficients tuned for fast convergence of the singular
# values towards ~1 (Keller Jordan's Muon); 5 steps are enough for training
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T, deterministic for a given device and dtype."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        # x <- a x + (b m + c m @ m) @ x with m = x @ x.T; products through kernels.matmul_nt
        # (oneDNN on the CPU, twice MKL's speed on AMD), sums in place
        m = matmul_nt(x, x)
        p = matmul_nt(m, m.t()).mul_(c).add_(m, alpha=b)
        x = matmul_nt(p, x.t()).add_(x, alpha=a)
    if tall:
        x = x.mT
    return x.to(g.dtype)


class _Optimizer:
    """Param groups, per-parameter state and an index-based state dict.

    Not torch.optim.Optimizer: its constructor imports torch._dynamo, two
    seconds of CPU on every launch of a trainer that never compiles on a CPU.
    """

    def __init__(self, groups: list[dict], defaults: dict):
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            p.grad = None

    def state_dict(self) -> dict:
        index = {id(p): i for i, p in enumerate(self._params())}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"param_groups": groups, "state": state}

    def load_state_dict(self, sd: dict) -> None:
        params = self._params()
        if len(sd["param_groups"]) != len(self.param_groups) or \
                [len(g["params"]) for g in sd["param_groups"]] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match the model's parameters")
        for g, saved in zip(self.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for i, s in sd["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.to(device=p.device, dtype=p.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                             else v for k, v in s.items()}


class AdamW(_Optimizer):
    """Adam with decoupled weight decay; the step count is a plain int so the math is the same everywhere."""

    def __init__(self, groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(groups, dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {})
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    p.mul_(1 - lr * wd)
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


class Muon(_Optimizer):
    """Nesterov momentum, orthogonalised, scaled by sqrt(max(1, rows/cols))."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95):
        super().__init__([dict(params=params)], dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {})
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom)  # Nesterov: look ahead along the momentum
                update = orthogonalize(update)
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update, alpha=-lr * scale)


class Optimizers:
    """The two optimizers as one: step, zero_grad, lr scaling and one state dict."""

    def __init__(self, adamw: AdamW, muon: Muon):
        self.adamw, self.muon = adamw, muon
        self.all = (adamw, muon)

    @property
    def param_groups(self):
        return [g for opt in self.all for g in opt.param_groups]

    def set_lr_multiplier(self, lrm: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * lrm

    def set_muon_momentum(self, momentum: float) -> None:
        for g in self.muon.param_groups:
            g["momentum"] = momentum

    def step(self) -> None:
        for opt in self.all:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad()

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.adamw.load_state_dict(sd["adamw"])
        self.muon.load_state_dict(sd["muon"])


def build_optimizers(model, *, embedding_lr: float, unembedding_lr: float, matrix_lr: float,
                     weight_decay: float, betas: tuple[float, float], init_lr_frac: float) -> Optimizers:
    width = model.config.n_embd
    # AdamW lrs were tuned at width 768; scale them like nanochat for other widths
    scale = (width / 768) ** -0.5
    matrices = [p for p in model.blocks.parameters()]
    adam_groups = [dict(params=list(model.wte.parameters()), lr=embedding_lr * scale),
                   dict(params=list(model.lm_head.parameters()), lr=unembedding_lr * scale)]
    adamw = AdamW(adam_groups, betas=betas, eps=1e-10, weight_decay=weight_decay)
    muon = Muon(matrices, lr=matrix_lr, momentum=0.95)
    opt = Optimizers(adamw, muon)
    for g in opt.param_groups:
        g["lr"] = g["lr"] * init_lr_frac
        g["initial_lr"] = g["lr"]
    return opt
