"""CRMAAdapter: one CRMA adapter's parameters for every decoder block, stacked along depth, and the side channel math.

Einsum letters: `b` batch, `t` tokens, `d` model dim, `r` stream rank, `l` layers, `i`/`j` streams (n of them),
`c` = n * r (the streams of the side state flattened, stream-major: index i * r + k).

Per block l, with h the block input and y its output (base + LoRA):

    u   = rmsnorm(y - h) @ A_l                   # b t r    the block's update, projected to rank r
    M   = sinkhorn(log_mix_l)                    # i j      doubly stochastic
    S'  = M (S + post (x) u)                     # b t i r  write, then mix (S = 0 before the first block)
    c   = rho^T S'                               # b t r    read
    out = y + (alpha * c) @ B_l                  # b t d    B = 0 at init: exactly y

with post = 2 sigmoid(write_logits), rho = softmax(read_logits), alpha = exp(clamp(log_alpha)). With the streams
flattened (S: b t c) the block is two products with matrices that depend on the parameters only:

    S'  = S @ K_l + rmsnorm(y - h) @ W_l         K = M^T (x) I_r (c c),  W[:, i r + k] = (M post)_i A[:, k]  (d c)
    out = y + S' @ R_l                           R[i r + k, :] = alpha rho_i B[k, :]                      (c d)

`CRMAAdapter.operands` builds K, W, R of every block at once (one batched Sinkhorn over the stacked `log_mix`), and
each block runs one autograd function, `_SideChannel`, with a hand-written backward. On a GPU a small model's step is
bound by kernel launches, not FLOPs: the parameters are stacked over depth (6 tensors per adapter instead of 6 per
block: the optimizer and autograd spend ~3 ops per tensor per step) and each block costs 8 kernels forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .basis import DEFAULT_CACHE, orthonormal_basis, writing_weights
from .config import CRMAConfig
from .sinkhorn import autocast_device, sinkhorn

Operands = tuple[torch.Tensor, ...]  # per block: W, K, R (differentiable), -W^T, K^T, R^T, eps (constants)


def _no_lower_than_fp32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
            return t.to(device=out.device, dtype=torch.float32)  # keep the fp32 values; follow only the device
        return out

    return convert


class _SideChannel(torch.autograd.Function):
    """One block of the side channel: (y, h, S) -> (y + S' @ R, S'), S' = S @ K + rmsnorm(y - h) @ W.

    Every product is a single bmm against a `(b, ., .)` operand (a stride-0 expansion of the block's matrix), so
    nothing is reshaped. Saved for backward: the normalised update (b t d, in the operands' dtype), the side states
    (b t c) and the inverse RMS (b t 1); y and h are not kept.
    """

    @staticmethod
    def forward(ctx, y, h, state, w, k, r, neg_w_t, k_t, r_t, eps):
        ctx.set_materialize_grads(False)
        dtype = w.dtype
        y_c, h_c = y.to(dtype), h.to(dtype)  # a bf16 residual stream: the side channel runs in fp32
        delta = y_c - h_c
        norm = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)
        inv_rms = torch.rsqrt(torch.addcmul(eps, norm, norm, value=1.0 / delta.shape[-1]))  # b t 1
        x_hat = delta * inv_rms
        u = torch.bmm(x_hat, w)  # b t c: the update written into every stream and mixed
        new_state = u if state is None else torch.baddbmm(u, state, k)
        out = torch.baddbmm(y_c, new_state, r)  # exactly y while R = 0 (B = 0)
        # Saving a tensor that is also returned costs autograd a detach in forward and another in backward: save
        # new_state and return a view of it instead (one view op).
        ctx.save_for_backward(x_hat, inv_rms, u, state, new_state, neg_w_t, k_t, r_t)
        ctx.y_dtype, ctx.h_dtype = y.dtype, h.dtype
        return out.to(y.dtype), new_state.view_as(new_state)

    @staticmethod
    def backward(ctx, grad_out, grad_state_out):
        x_hat, inv_rms, u, state, new_state, neg_w_t, k_t, r_t = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_y = grad_h = grad_state = grad_w = grad_k = grad_r = None
        if grad_out is None:  # the output is unused: only the side state carries a gradient
            grad_out = torch.zeros_like(x_hat)
        grad_out = grad_out.to(x_hat.dtype)
        # Total gradient of S': from the next block (through its S) and from this block's read.
        g_s = torch.bmm(grad_out, r_t) if grad_state_out is None else torch.baddbmm(grad_state_out, grad_out, r_t)
        if needs[5]:
            grad_r = torch.bmm(new_state.transpose(1, 2), grad_out)
        if state is not None and needs[2]:
            grad_state = torch.bmm(g_s, k_t)
        if state is not None and needs[4]:
            grad_k = torch.bmm(state.transpose(1, 2), g_s)
        if needs[3]:
            grad_w = torch.bmm(x_hat.transpose(1, 2), g_s)
        if needs[0] or needs[1]:
            # rmsnorm backward: grad_delta = inv_rms * (g - x_hat * mean(g * x_hat)) with g = g_s W^T, and
            # sum_d(g * x_hat) = g_s . (x_hat W) = g_s . u: an r-wide dot instead of a d-wide one. Computed negated
            # (W^T comes negated), so that grad_h = -grad_delta and grad_y = grad_out + grad_delta are one op each.
            dot = (g_s * u).sum(-1, keepdim=True)
            neg_pre = torch.addcmul(torch.bmm(g_s, neg_w_t), dot, x_hat, value=1.0 / x_hat.shape[-1])
            if needs[0]:
                grad_y = torch.addcmul(grad_out, neg_pre, inv_rms, value=-1.0).to(ctx.y_dtype)
            if needs[1]:
                grad_h = (neg_pre * inv_rms).to(ctx.h_dtype)
        return grad_y, grad_h, grad_state, grad_w, grad_k, grad_r, None, None, None, None


def side_channel(
    y: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None, operands: Operands
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of the side channel (see the module docstring), fp32 whatever the surrounding autocast does.

    Args:
        y (`torch.Tensor`): `(b, t, d)` the block's output.
        h (`torch.Tensor`): `(b, t, d)` the block's input.
        state (`torch.Tensor | None`): `(b, t, c)` the side state S from the previous block, None before block 0.
        operands (`Operands`): this block's entry of `CRMAAdapter.operands(b)`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the block output with the CRMA read added (y's dtype), and S'.
    """
    with torch.autocast(device_type=autocast_device(y), enabled=False):
        return _SideChannel.apply(y, h, state, *operands)


class CRMAAdapter(nn.Module):
    """The trainable parameters of one CRMA adapter: every decoder block's, stacked along a leading depth axis l.

    Parameters (l = `num_layers`): `crma_A` (l, d, r), `crma_B` (l, r, d), `crma_log_mix` (l, n, n; absent when
    `config.mixing` is `identity`), `crma_read_logits` (l, n), `crma_write_logits` (l, n), `crma_log_alpha` (l).
    They are at least float32: a cast of the model to bf16 / fp16 (`.to`, `.half()`, ...) leaves them float32, a
    cast to float64 makes them float64. They are part of the model's `state_dict()` (under
    `...crma.<adapter>.crma_A`, ...), so a generic checkpoint (`torch.save(model.state_dict())`, `accelerate`'s
    `save_state`) keeps them; `crma.attach` lists them in the HF model's `_keys_to_ignore_on_save`, so
    `save_pretrained` of the base model (merged or not) writes a clean base checkpoint. `crma.save` / `crma.load`
    move one adapter on its own.

    Args:
        config (`CRMAConfig`): shared settings.
        num_layers (`int`): L, the number of decoder blocks.
        hidden_size (`int`): d.
        device (`torch.device | str | None`): where the parameters live (`meta` is allowed).
    """

    def __init__(
        self, config: CRMAConfig, num_layers: int, hidden_size: int, device: torch.device | str | None = None
    ):
        super().__init__()
        n, r, d, L = config.n_streams, config.rank, hidden_size, num_layers
        if r > d:
            raise ValueError(f"`rank` must be <= the hidden size {d}; got {r}")
        self.config = config
        self.num_layers = L
        self.hidden_size = d
        self._decoder_layers: nn.ModuleList | None = None  # where `reset_parameters` reads the writing weights
        kw = {"device": device, "dtype": torch.float32}
        self.crma_A = nn.Parameter(torch.zeros(L, d, r, **kw))
        self.crma_B = nn.Parameter(torch.zeros(L, r, d, **kw))
        if config.mixing == "sinkhorn":  # the identity control has no mixing logits to train (or to save)
            self.crma_log_mix = nn.Parameter(torch.zeros(L, n, n, **kw))
        self.crma_read_logits = nn.Parameter(torch.zeros(L, n, **kw))
        self.crma_write_logits = nn.Parameter(torch.zeros(L, n, **kw))
        self.crma_log_alpha = nn.Parameter(torch.zeros(L, **kw))
        if not self.crma_B.is_meta:
            self.reset_structure()

    def bind(self, layers: nn.ModuleList) -> None:
        """Remember the decoder blocks this adapter sits beside (not registered: they are not its submodules)."""
        object.__setattr__(self, "_decoder_layers", layers)

    # -- initialisation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_structure(self) -> None:
        """Near-identity init of everything but A: B = 0, M = p on the diagonal, peaked reads/writes, the gate."""
        cfg, n = self.config, self.config.n_streams
        self.crma_B.zero_()
        if cfg.mixing == "sinkhorn":
            self.crma_log_mix.copy_(torch.eye(n) * cfg.mix_init_logit)
        # Peaked reads and writes on stream (l mod n): with uniform reads rho^T M = rho^T for every doubly stochastic
        # M, so the mixing would be invisible to the loss and get no gradient (see the design doc).
        home = torch.full((self.num_layers, n), -1.0)
        home[torch.arange(self.num_layers), torch.arange(self.num_layers) % n] = 1.0
        self.crma_read_logits.copy_(home * cfg.read_init)
        self.crma_write_logits.copy_(home * cfg.write_init)
        self.crma_log_alpha.fill_(math.log(cfg.gate_init))

    @torch.no_grad()
    def reset_A(self, bases: list[torch.Tensor] | None = None) -> None:
        """Set A from `bases` (one `(d, r)` per block), or from the config's `init_A` when None.

        `principal` reads the writing weights of the decoder blocks the adapter is attached to, as they are now
        (through `crma.basis.DEFAULT_CACHE`); `orthonormal` is seeded by `init_seed + l`.
        """
        cfg, L, d, r = self.config, self.num_layers, self.hidden_size, self.config.rank
        if bases is None:
            if cfg.init_A == "orthonormal":
                bases = [orthonormal_basis(d, r, seed=cfg.init_seed + index) for index in range(L)]
            else:
                if self._decoder_layers is None:
                    raise ValueError(
                        "init_A='principal' needs the decoder blocks: attach the adapter with crma.attach"
                    )
                weights = [writing_weights(layer, index) for index, layer in enumerate(self._decoder_layers)]
                if any(w.is_meta for ws in weights for w in ws):
                    raise ValueError("the writing weights are on the meta device: load the base weights first")
                bases = DEFAULT_CACHE.get(weights, r)
        if len(bases) != L or any(tuple(b.shape) != (d, r) for b in bases):
            shapes = sorted({tuple(b.shape) for b in bases})
            raise ValueError(f"`bases` must be {L} tensors of shape ({d}, {r}); got {len(bases)} of shapes {shapes}")
        self.crma_A.copy_(torch.stack([b.to(self.crma_A.device) for b in bases]))

    def reset_parameters(self) -> None:
        """Re-initialise every parameter as `crma.attach` does (the torch / FSDP convention after `to_empty()`).

        For a model attached on the meta device: materialise (`model.to_empty(device=...)`), load the base weights,
        then call this: with `init_A='principal'` the basis comes from the loaded writing weights.
        """
        self.reset_structure()
        self.reset_A()

    # -- dtype, device and state_dict -----------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would round the side channel's parameters to 8 mantissa bits: keep them
        # at least float32 (a float64 cast still applies; device moves and to_empty() pass through unchanged).
        return super()._apply(_no_lower_than_fp32(fn), recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # A base checkpoint (saved by `save_pretrained`, or before attach) has no CRMA keys: they are not "missing",
        # and CRMA keeps its values. A checkpoint that has them (`model.state_dict()` with CRMA) loads them.
        if any(key.startswith(prefix) for key in state_dict):
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
            )

    # -- the mixing and the per-step operands ---------------------------------------------------------------------
    def mixing(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, post, rho) of every block: `(l, n, n)` doubly stochastic (exactly I for `mixing="identity"`),
        `(l, n)` write and `(l, n)` read weights."""
        write = self.crma_write_logits
        with torch.autocast(device_type=autocast_device(write), enabled=False):
            if self.config.mixing == "identity":
                n = self.config.n_streams
                mix = torch.eye(n, dtype=write.dtype, device=write.device).expand(self.num_layers, n, n)
            else:
                mix = sinkhorn(self.crma_log_mix, self.config.sinkhorn_iters)
            return mix, 2.0 * torch.sigmoid(write), torch.softmax(self.crma_read_logits, -1)

    def gate(self) -> torch.Tensor:
        """alpha = exp(clamp(log_alpha)) of every block, `(l,)`."""
        return self.crma_log_alpha.clamp(self.config.log_alpha_min, self.config.log_alpha_max).exp()

    def operands(self, batch: int) -> list[Operands]:
        """Every block's W, K, R (and -W^T, K^T, R^T and eps, constants of the backward), expanded to `batch`.

        Computed once per forward: the parameters enter the graph here, in ~130 batched ops whatever the depth
        (80 of them the Sinkhorn passes).
        """
        L, n, r = self.num_layers, self.config.n_streams, self.config.rank
        with torch.autocast(device_type=autocast_device(self.crma_A), enabled=False):
            mix, post, rho = self.mixing()  # l i j, l j, l i
            # Write then mix: M (S + post (x) u) = M S + (M post) (x) u.
            mixed_post = torch.bmm(mix, post.unsqueeze(-1))  # l i 1
            w = (self.crma_A.unsqueeze(2) * mixed_post.unsqueeze(1)).flatten(2)  # l d 1 r * l 1 i 1 -> l d (i r)
            eye = torch.eye(r, dtype=mix.dtype, device=mix.device)
            # K = M^T (x) I_r, built as its transpose M (x) I_r (a broadcast product with no copy) and used transposed.
            k_t = (mix[:, :, None, :, None] * eye[:, None, :]).reshape(L, n * r, n * r)  # l (i r) (j r)
            read = rho * self.gate().unsqueeze(-1)  # l i
            r_mat = (read[:, :, None, None] * self.crma_B.unsqueeze(1)).flatten(1, 2)  # l (i r) d
            eps = torch.full((), self.config.eps, dtype=mix.dtype, device=mix.device)
            # One (batch, ., .) stride-0 view per block and matrix: the blocks' bmm need no reshapes.
            per_block = [t.expand(batch, *t.shape).unbind(1) for t in (w, k_t.mT, r_mat)]
            with torch.no_grad():  # constants of the backward: no graph, and no detach op
                per_block += [t.expand(batch, *t.shape).unbind(1) for t in (w.neg().mT, k_t, r_mat.mT)]
        return [(*block, eps) for block in zip(*per_block, strict=True)]
