"""Sinkhorn-Knopp projection of logits onto the doubly stochastic matrices (log domain)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def autocast_device(tensor: torch.Tensor) -> str:
    """The `torch.autocast` device type that governs ops on `tensor` (cpu for devices autocast does not know)."""
    return tensor.device.type if tensor.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"


class _Sinkhorn(torch.autograd.Function):
    """The 2 * iters log-domain passes, with a hand-written backward of exactly those passes.

    Autograd of the unrolled loop records ~10 kernels per pass (logsumexp, its backward, views). Here the forward
    keeps each pass's result (n x n per matrix: tiny) and the backward walks the passes in reverse with three
    kernels each: the result is the exact gradient of the computed forward, not an approximation at the fixed point.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        log_m, passes = logits, []
        # Log domain: exp() of large logits would overflow long before the normalisation brings them back.
        for _ in range(iters):
            log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # columns
            passes.append(log_m)
            log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # rows
            passes.append(log_m)
        m = log_m.exp()
        ctx.save_for_backward(m, *passes[:-1])
        return m.view_as(m)  # a returned tensor that is also saved would cost a detach op each way

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_m: torch.Tensor):
        m, *passes = ctx.saved_tensors
        grad = grad_m * m  # d/d(log m) of exp(log m)
        # Pass k maps x to x' = x - logsumexp(x, dim); its vector-Jacobian product is
        # g - softmax(x, dim) * sum(g, dim), and softmax(x, dim) = exp(x') is the pass's own (saved) result.
        # The last pass's exp(x') is m itself.
        for k in range(len(passes), -1, -1):
            soft = m if k == len(passes) else passes[k].exp()
            dim = -2 if k % 2 == 0 else -1  # even passes normalise columns, odd ones rows
            grad = torch.addcmul(grad, soft, grad.sum(dim, keepdim=True), value=-1.0)
        return grad, None


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Return the doubly stochastic matrix exp(logits) normalised by `iters` column-then-row passes.

    Args:
        logits (`torch.Tensor`): `(..., n, n)` unconstrained logits H.
        iters (`int`): Sinkhorn-Knopp iterations (each one column pass, then one row pass).

    Returns:
        `torch.Tensor`: `(..., n, n)` non-negative matrix whose rows sum to exactly 1 (the last pass) and whose
        columns sum to 1 up to the convergence error. Computed in at least float32 with autocast off, so a
        float64 input stays float64 (gradcheck) and a bf16 caller still gets an fp32 matrix. The gradient is the
        exact gradient of these `iters` iterations (a hand-written backward; not differentiable twice).
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"`logits` must be (..., n, n); got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"`iters` must be >= 1; got {iters}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=autocast_device(logits), enabled=False):
        return _Sinkhorn.apply(logits.to(dtype), iters)
