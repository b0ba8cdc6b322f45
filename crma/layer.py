"""CRMABlock: the per-decoder-block parameters and math of the CRMA side channel.

Einsum letters: `b` batch, `t` tokens, `d` model dim, `r` stream rank, `s`/`i`/`j` streams (n of them).

Per block l, with h the block input and y its output (base + LoRA):

    u   = rmsnorm(y - h) @ A                   # b t r    the block's update, projected to rank r
    M   = sinkhorn(log_mix)                    # i j      doubly stochastic
    S'  = M (S + post (x) u)                   # b t i r  write, then mix (S = 0 before the first block)
    c   = rho^T S'                             # b t r    read
    out = y + (alpha * c) @ B                  # b t d    B = 0 at init: exactly y

with post = 2 sigmoid(write_logits), rho = softmax(read_logits), alpha = exp(clamp(log_alpha)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import CRMAConfig
from .sinkhorn import sinkhorn


class _RMSUpdateProjection(torch.autograd.Function):
    """u = rmsnorm(y - h) @ A, without keeping a d-wide copy of the update alive for backward.

    Autograd would save (y - h) and its normalised copy: two full-width tensors per block. y and h are kept by
    the surrounding graph anyway (they feed the blocks' norms), so backward recomputes y - h from them and this
    function stores only r-wide and per-token tensors. The normalisation's gradient is folded into r-wide
    products too (mean_d(g_hat * delta_hat) = (g_u . u) / d), so each direction makes only a few d-wide passes.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, h: torch.Tensor, A: torch.Tensor, eps: float) -> torch.Tensor:
        ctype = torch.promote_types(torch.promote_types(y.dtype, A.dtype), torch.float32)  # fp64 stays fp64
        delta = y.to(ctype) - h.to(ctype)  # b t d
        d = delta.shape[-1]
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(delta, dim=-1, keepdim=True).square() / d + eps)  # b t 1
        u = (delta @ A.to(ctype)) * inv_rms  # scale the r-wide product, not the d-wide input
        ctx.save_for_backward(y, h, A, inv_rms, u)
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):
        y, h, A, inv_rms, u = ctx.saved_tensors
        ctype = inv_rms.dtype
        delta = y.to(ctype) - h.to(ctype)
        d = delta.shape[-1]
        grad_u = grad_u.to(ctype)
        scaled = grad_u * inv_rms  # b t r
        grad_A = grad_y = grad_h = None
        if ctx.needs_input_grad[2]:
            grad_A = (delta.reshape(-1, d).t() @ scaled.reshape(-1, scaled.shape[-1])).to(A.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # d/d(delta) of inv_rms * (delta @ A): inv_rms * g A^T - inv_rms^3 / d * (g . (delta @ A)) * delta
            coef = (grad_u * u).sum(-1, keepdim=True) * inv_rms.square() / d  # b t 1
            grad_delta = torch.addcmul(scaled @ A.to(ctype).t(), coef, delta, value=-1.0)
            if ctx.needs_input_grad[0]:
                grad_y = grad_delta.to(y.dtype)
            if ctx.needs_input_grad[1]:
                grad_h = grad_delta.neg().to(h.dtype)
        return grad_y, grad_h, grad_A, None


def orthonormal_basis(d: int, r: int, *, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded random d x r matrix with orthonormal columns (does not touch the global RNG)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    return q.to(device=device, dtype=torch.float32)


def principal_basis(weights: list[torch.Tensor], r: int) -> torch.Tensor:
    """Top-r left singular vectors of the column-concatenated writing weights `[W_o | W_down]` (each d x k).

    Computed from the d x d Gram matrix with `eigh` (deterministic, and d^2 memory instead of a d x (k1+k2) SVD);
    each column's sign is fixed so its largest entry is positive.
    """
    # The d x d Gram in the weights' own precision (fp32 after dequantising), then eigh in float64: no float64
    # copy of the d x k weights, which glibc would keep in the process long after they are freed.
    gram = torch.zeros(weights[0].shape[0], weights[0].shape[0], dtype=torch.float64, device=weights[0].device)
    for w in weights:
        w32 = w.to(torch.float32)
        gram += (w32 @ w32.t()).to(torch.float64)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    basis = vecs[:, -r:].flip(-1)
    rows = basis.abs().argmax(0)
    signs = torch.sign(basis[rows, torch.arange(r, device=basis.device)])
    return (basis * signs).to(torch.float32)


class CRMABlock(nn.Module):
    """The trainable CRMA parameters of one decoder block, all fp32.

    Args:
        config (`CRMAConfig`): shared settings.
        hidden_size (`int`): d.
        index (`int`): the block's depth l; sets which stream it writes and reads first.
        device (`torch.device | str | None`): where the parameters live (`meta` is allowed).
    """

    def __init__(self, config: CRMAConfig, hidden_size: int, index: int, device: torch.device | str | None = None):
        super().__init__()
        n, r, d = config.n_streams, config.rank, hidden_size
        self.config = config
        self.index = index
        kw = {"device": device, "dtype": torch.float32}
        self.crma_A = nn.Parameter(torch.zeros(d, r, **kw))
        self.crma_B = nn.Parameter(torch.zeros(r, d, **kw))
        self.crma_log_mix = nn.Parameter(torch.zeros(n, n, **kw))
        self.crma_read_logits = nn.Parameter(torch.zeros(n, **kw))
        self.crma_write_logits = nn.Parameter(torch.zeros(n, **kw))
        self.crma_log_alpha = nn.Parameter(torch.zeros((), **kw))
        self.reset_structure()

    @torch.no_grad()
    def reset_structure(self) -> None:
        """Near-identity init of everything but A: B = 0, M = p on the diagonal, peaked reads/writes, alpha."""
        cfg, n = self.config, self.config.n_streams
        if self.crma_B.is_meta:
            return
        self.crma_B.zero_()
        self.crma_log_mix.copy_(torch.eye(n) * cfg.mix_init_logit)
        # Peaked, rotating reads and writes: with uniform reads rho^T M = rho^T for every doubly stochastic M,
        # so the mixing would be invisible to the loss and get no gradient (see the design doc).
        home = torch.full((n,), -1.0)
        home[self.index % n] = 1.0
        self.crma_read_logits.copy_(home * cfg.read_init)
        self.crma_write_logits.copy_(home * cfg.write_init)
        self.crma_log_alpha.fill_(math.log(cfg.gate_init))

    def mixing_matrix(self) -> torch.Tensor:
        """M = sinkhorn(log_mix), fp32, (n, n)."""
        return sinkhorn(self.crma_log_mix, self.config.sinkhorn_iters)

    def gate(self) -> torch.Tensor:
        """alpha = exp(clamp(log_alpha))."""
        return self.crma_log_alpha.clamp(self.config.log_alpha_min, self.config.log_alpha_max).exp()

    def mixing(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, post, rho) of this block: the mixing matrix, write weights 2 sigmoid(.), read weights softmax(.)."""
        post = 2.0 * torch.sigmoid(self.crma_write_logits)
        return self.mixing_matrix(), post, torch.softmax(self.crma_read_logits, -1)

    def forward(
        self,
        h: torch.Tensor,
        y: torch.Tensor,
        state: torch.Tensor | None,
        mixing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (the block output with the CRMA read added, the new side state S' of shape b t n r).

        `mixing` is this block's (M, post, rho) when the caller computed every block's at once (see `batched_mixing`).
        """
        device_type = y.device.type if y.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        # The side channel is O(d*r) per token: run it in fp32 whatever the surrounding autocast does.
        with torch.autocast(device_type=device_type, enabled=False):
            mix, post, rho = mixing if mixing is not None else self.mixing()
            u = _RMSUpdateProjection.apply(y, h, self.crma_A, self.config.eps)  # b t r
            # Broadcasts and matmuls rather than einsum: these tensors are tiny (n*r per token), so the cost is
            # the number of kernels, and einsum adds permutes and copies around each of its bmm calls.
            written = post.unsqueeze(-1) * u.unsqueeze(-2)  # s,btr->btsr
            if state is not None:
                written = written + state.to(written.device)  # blocks may sit on different devices
            new_state = torch.matmul(mix, written)  # ij,btjr->btir
            # Scale the r-wide read, not the d-wide product, so nothing d-wide is saved for the gate's gradient.
            read = torch.matmul(rho * self.gate(), new_state)  # i,btir->btr
            if y.dtype == read.dtype:  # one fused y + read @ B: exactly y while B = 0
                y_out = torch.addmm(y.reshape(-1, y.shape[-1]), read.reshape(-1, read.shape[-1]), self.crma_B)
                return y_out.view_as(y), new_state
            delta = read @ self.crma_B
        return y + delta.to(y.dtype), new_state


def batched_mixing(blocks: list[CRMABlock]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """Every block's (M, post, rho) from one batched Sinkhorn over the stacked logits (None if they differ in
    device or config): one call of ~40 small kernels instead of one per block, forward and backward."""
    first = blocks[0]
    if any(b.config != first.config or b.crma_log_mix.device != first.crma_log_mix.device for b in blocks):
        return None
    mixes = sinkhorn(torch.stack([b.crma_log_mix for b in blocks]), first.config.sinkhorn_iters)
    posts = 2.0 * torch.sigmoid(torch.stack([b.crma_write_logits for b in blocks]))
    rhos = torch.softmax(torch.stack([b.crma_read_logits for b in blocks]), -1)
    return list(zip(mixes.unbind(0), posts.unbind(0), rhos.unbind(0), strict=True))
