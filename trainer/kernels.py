"""CPU fast paths for the model's two heaviest parts: its matmuls and the head's softcapped cross-entropy.

What the profile of a CPU step showed (depth 2, width 128, vocab 4,096, rows of
128 tokens; one core): matmuls were ~55 % of the time, through MKL, which on
AMD processors runs its AVX2 code (it prints "Intel(R) Architecture processors"
under MKL_VERBOSE); oneDNN, in the same torch build, picks its kernels by
instruction set and runs the same products with AVX-512 in 40-50 % of the time.
The rest of the head's time went to ~12 elementwise passes over the
(rows, vocab) logits (softcap, log_softmax, nll and their backwards).

- `linear` is F.linear, through oneDNN for float32 CPU tensors in eager mode
  (under torch.compile, on CUDA, or without oneDNN it is F.linear itself).
- `SoftcappedCrossEntropy` is the loss of GPT(idx, targets, fused=True): chunks of rows
  whose logits stay in cache, the gradients worked out in the forward pass.

Both are deterministic (a fixed order of the same kernels for the same shapes
and thread count), which exact resume needs. They change rounding only: losses
and gradients match the plain forms to float32 precision (tests/test_trainer_kernels.py).
This module knows nothing of the model's layout, optimizers or data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_linear_pointwise = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
ONEDNN = bool(torch.backends.mkldnn.is_available() and _linear_pointwise is not None)


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D tensors (views with any strides); through oneDNN for float32 CPU ones."""
    if ONEDNN and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32:
        return _linear_pointwise(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


def _onednn_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T without a bias, as F.linear."""
    if _onednn_eligible(x, weight):
        return OneDnnLinear.apply(x, weight)
    return F.linear(x, weight)


class OneDnnLinear(torch.autograd.Function):
    """F.linear whose forward and both backward products are oneDNN matmuls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return matmul_nt(x.reshape(-1, x.size(-1)), weight).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.size(-1))
        grad_x = matmul_nt(g, weight.t()).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = matmul_nt(g.t(), x.reshape(-1, x.size(-1)).t()) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


CHUNK_BYTES = 2**21   # float32 logits of one chunk of rows (128 at vocab 4,096: measured best of 64-256)
MIN_CHUNK_ROWS = 64   # with fewer rows a chunk's matmuls lose their efficiency (a large vocab)


class SoftcappedCrossEntropy(torch.autograd.Function):
    """sum of CE(cap * tanh(h @ W.T / cap), y) over y != -1 (a 0-d float32), gradients worked out in the forward.

    Chunk by chunk of rows: the chunk's logits, its loss, dL/dlogits, then its share
    of dL/dh and dL/dW; backward only scales those by the incoming gradient. So the
    (rows, vocab) logits never exist whole and each chunk is touched a few times
    while in cache (measured: the loss's elementwise work per 512 x 4,096 micro-batch
    from ~19 ms to ~4 ms on one core).

    The softcap goes through sigmoid: with s = sigmoid(2x / cap), cap * tanh(x / cap)
    = cap * (2s - 1) and its derivative 1 - tanh^2 = 4 s (1 - s). torch's CPU tanh
    is 4x slower than sigmoid (4.7 vs 1.1 ms for 2M floats), and the derivative
    comes for free. exp needs no max subtracted: |logit| <= cap, so no row's sum
    of exps can overflow.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        n, vocab = h.size(0), weight.size(0)
        rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.float()
        valid = targets >= 0
        masked = not bool(valid.all())
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if want_grad else None
        grad_wt = None  # dL/dW transposed, (n_embd, vocab): its product then reads the chunk's big operand in place
        for i in range(0, n, rows):
            hc, yc = h[i:i + rows].float(), targets[i:i + rows].clamp(min=0)[:, None]
            s = matmul_nt(hc, w).mul_(2 / cap).sigmoid_()
            z = s.mul(2 * cap).sub_(cap)                     # the softcapped logits
            z_target = z.gather(1, yc).squeeze(1)
            e = z.exp_()
            sums = e.sum(1)
            row_loss = sums.log().sub_(z_target)
            if masked:
                row_loss = row_loss.where(valid[i:i + rows], 0.0)
            total += row_loss.sum()
            if not want_grad:
                continue
            g = e.mul_(sums.reciprocal_().mul_(4)[:, None])  # 4 softmax ...
            g.scatter_add_(1, yc, torch.full_like(z_target, -4.0)[:, None])  # ... minus 4 one-hot ...
            g.mul_(s.addcmul_(s, s, value=-1))               # ... times s (1 - s): dL/dlogits
            if masked:
                g.masked_fill_(~valid[i:i + rows, None], 0.0)
            grad_h[i:i + rows] = matmul_nt(g, w.t())
            part = matmul_nt(hc.t(), g.t())
            grad_wt = part if grad_wt is None else grad_wt.add_(part)
        ctx.grads = (grad_h, grad_wt.t().contiguous() if want_grad else None)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # scaled in place below: a second backward through this graph is not supported
        return grad_h.mul_(grad_out).to(ctx.dtypes[0]), grad_w.mul_(grad_out).to(ctx.dtypes[1]), None, None
