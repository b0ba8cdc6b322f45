"""Sinkhorn-Knopp projection of logits onto the doubly stochastic matrices (log domain)."""

from __future__ import annotations

import torch


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Return the doubly stochastic matrix exp(logits) normalised by `iters` column-then-row passes.

    Args:
        logits (`torch.Tensor`): `(..., n, n)` unconstrained logits H.
        iters (`int`): Sinkhorn-Knopp iterations (each one column pass, then one row pass).

    Returns:
        `torch.Tensor`: `(..., n, n)` non-negative matrix whose rows sum to exactly 1 (the last pass) and whose
        columns sum to 1 up to the convergence error. Computed in at least float32 with autocast off, so a
        float64 input stays float64 (gradcheck) and a bf16 caller still gets an fp32 matrix.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"`logits` must be (..., n, n); got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"`iters` must be >= 1; got {iters}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    device_type = logits.device.type if logits.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        log_m = logits.to(dtype)
        # Log domain: exp() of large logits would overflow long before the normalisation brings them back.
        for _ in range(iters):
            log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # columns
            log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # rows
        return log_m.exp()
