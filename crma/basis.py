"""The down projection A's initial bases: principal (top-r left singular vectors of a block's writing weights), or
seeded orthonormal; and a cache that computes each principal basis once per content of the weights.

Letters: `d` model dim, `k` a weight's input width, `b` Krylov block width, `m` Krylov space width, `r` rank.

The principal basis is the top-r eigenspace of the Gram G = W W^T of W = [W_o | W_down] (d x (k_o + k_down)), found by
block Krylov iteration (block Lanczos with full re-orthogonalisation) and a Rayleigh-Ritz step, stopped when the
Ritz residuals are small. A full eigendecomposition of G is O(d^3) for r = 4 vectors; the iteration costs a few
products G @ X with b columns.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .utils import find_decoder_layers

WRITING_WEIGHTS = ("self_attn.o_proj", "mlp.down_proj")
# Up to this width the d x d Gram is formed once (one large, efficient GEMM) and iterated on; above it, G is applied
# as W (W^T X) without ever forming it (d^2 (k_o + k_down) flops saved).
GRAM_MAX_DIM = 1024
# At most this many Krylov blocks of r + 4 columns (Krylov dimension 16 (r + 4)), or until every Ritz residual is
# below TOLERANCE * lambda_1. On SmolLM2-135M, whose top singular values are close (sigma_5 / sigma_4 = 0.94-0.99),
# 12 blocks give projectors within 2e-4 of the exact SVD's and 16 within 1e-6 (measured).
MAX_BLOCKS = 16
TOLERANCE = 1e-6
_SOLVER_VERSION = 1  # part of the cache key: bump when the solver's output changes


def orthonormal_basis(d: int, r: int, *, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded random d x r matrix with orthonormal columns (does not touch the global RNG)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    return q.to(device=device, dtype=torch.float32)


def _fix_signs(basis: torch.Tensor) -> torch.Tensor:
    # Singular vectors are defined up to sign: make each column's largest entry positive, so results are reproducible.
    rows = basis.abs().argmax(0)
    signs = torch.sign(basis[rows, torch.arange(basis.shape[1], device=basis.device)])
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


def _block_krylov(apply: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors of a batch of symmetric PSD operators, by block Krylov iteration and Rayleigh-Ritz.

    `apply` maps `(l, d, c)` to `(l, d, c)` (G_l @ X_l for each of the l operators); `x0` is the `(l, d, b)` start
    block. Returns `(l, d, r)`, columns in descending order of eigenvalue. All l operators advance together, so a
    whole model costs a few dozen batched calls instead of thousands of small ones (which, with several threads on
    a busy machine, are slow).
    """
    n_ops, d, b = x0.shape
    m_max = min(d, b * MAX_BLOCKS)
    q = x0.new_empty(n_ops, d, m_max)  # l d m: orthonormal basis of the Krylov space, filled block by block
    gq = x0.new_empty(n_ops, d, m_max)  # l d m: G @ q
    q[..., :b] = torch.linalg.qr(x0)[0]
    gq[..., :b] = apply(q[..., :b])
    m, best, best_residual = b, None, None
    while True:
        width = min(b, m_max - m)
        # Rayleigh-Ritz costs O(m^3): do it every third block and at the end, not after each one.
        if width == 0 or m % (3 * b) == 0:
            h = (q[..., :m].mT @ gq[..., :m]).double()
            theta, v = torch.linalg.eigh((h + h.mT) / 2)  # ascending Ritz values
            top = v[..., -r:].flip(-1).to(q.dtype)
            ritz = q[..., :m] @ top
            resid = torch.linalg.vector_norm(
                gq[..., :m] @ top - ritz * theta[:, None, -r:].flip(-1).to(q.dtype), dim=1
            )
            resid = resid.double().amax(-1) / theta[..., -1].clamp_min(torch.finfo(torch.float64).tiny)  # / lambda_1
            if best is None:
                best, best_residual = ritz, resid
            else:  # in float32 the residual can level off near 1e-6 and then wander: keep each operator's best
                better = resid < best_residual
                best = torch.where(better[:, None, None], ritz, best)
                best_residual = torch.where(better, resid, best_residual)
            if (best_residual <= TOLERANCE).all() or width == 0:
                return best
        nxt = gq[..., m - b : m]
        for _ in range(2):  # re-orthogonalise twice: once loses orthogonality in floating point
            nxt = nxt - q[..., :m] @ (q[..., :m].mT @ nxt)
        q[..., m : m + width] = torch.linalg.qr(nxt)[0][..., :width]
        gq[..., m : m + width] = apply(q[..., m : m + width])
        m += width


def _float32(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [w.to(torch.float32) for w in weights]  # bf16 / fp16 weights: iterate in float32


def _start_block(n_ops: int, d: int, b: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)  # fixed: the basis is a function of the weights alone
    return torch.randn(d, b, generator=gen).to(device).expand(n_ops, d, b)


@torch.no_grad()
def principal_basis_batch(weight_lists: list[list[torch.Tensor]], r: int) -> list[torch.Tensor]:
    """`principal_basis` of several blocks at once (blocks of the same width and device are iterated together)."""
    out: list[torch.Tensor | None] = [None] * len(weight_lists)
    groups: dict[tuple[int, torch.device], list[int]] = {}
    for i, ws in enumerate(weight_lists):
        d = ws[0].shape[0]
        if r > d:
            raise ValueError(f"`rank` must be <= the hidden size {d}; got {r}")
        groups.setdefault((d, ws[0].device), []).append(i)
    b = r + 4  # a few extra columns: the block's convergence rate depends on lambda_r / lambda_{b+1}
    for (d, device), members in groups.items():
        if d <= GRAM_MAX_DIM:
            chunk = max(1, (256 << 20) // (4 * d * d))  # at most ~256 MB of Grams at a time
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                grams = torch.stack([sum(w @ w.t() for w in _float32(weight_lists[i])) for i in part])
                bases = _block_krylov(lambda x, g=grams: g @ x, _start_block(len(part), d, min(b, d), device), r)
                for i, basis in zip(part, bases.unbind(0), strict=True):
                    out[i] = basis
        else:
            for i in members:
                ws = _float32(weight_lists[i])
                x0 = _start_block(1, d, min(b, d), device)
                out[i] = _block_krylov(lambda x, ws=ws: sum(w @ (w.t() @ x[0]) for w in ws)[None], x0, r)[0]
    return [_fix_signs(b).to(torch.float32) for b in out]


def principal_basis(weights: list[torch.Tensor], r: int) -> torch.Tensor:
    """Top-r left singular vectors of the column-concatenated writing weights `[W_o | W_down]` (each d x k).

    Args:
        weights (`list[torch.Tensor]`): the block's writing weights, each `(d, k_i)` (dequantised if 4-bit).
        r (`int`): how many vectors.

    Returns:
        `torch.Tensor`: `(d, r)` float32 with orthonormal columns, on the weights' device; each column's sign is
        fixed so its largest entry is positive. Deterministic for given weights; the global RNG is not touched.
    """
    return principal_basis_batch([weights], r)[0]


def writing_weights(layer: nn.Module, index: int) -> list[torch.Tensor]:
    """The weights through which a decoder block writes into the residual stream (`o_proj`, `down_proj`).

    The weights the model holds now: with peft LoRA wrappers, the base layer's (a PiSSA residual when PiSSA
    initialised it); bitsandbytes 4-bit weights are dequantised.
    """
    weights = []
    for path in WRITING_WEIGHTS:
        try:
            module = layer.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"init_A='principal' needs `{path}` in every decoder block (block {index} of "
                f"{type(layer).__name__} has none); use CRMAConfig(init_A='orthonormal')"
            ) from None
        if hasattr(module, "get_base_layer"):  # peft LoRA wrapper: use the (possibly PiSSA-residual) base
            module = module.get_base_layer()
        weight = module.weight
        if type(weight).__name__ == "Params4bit":
            from peft.utils.integrations import dequantize_module_weight

            weight = dequantize_module_weight(module)
        weights.append(weight.detach())
    return weights


class BasisCache:
    """Principal bases keyed by the content of the writing weights and the rank, so that every CRMA adapter attached
    to the same weights (every arm and seed of an ablation) reuses one computation, and a changed weight (a PiSSA
    residual of another seed) gets its own.

    The key is a fingerprint: the weights' shapes and dtypes and the bytes of W @ p for a fixed random probe p
    (one pass over the weights, ~1 % of the solver's cost). Two different weights collide only if their difference
    is orthogonal to p in float32 arithmetic. At most `max_entries` bases are kept (least recently used dropped).

    Args:
        max_entries (`int`): capacity, in bases (one per decoder block and rank).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError(f"`max_entries` must be >= 1; got {max_entries}")
        self.max_entries = max_entries
        self._bases: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._probes: dict[tuple[int, str], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._bases)

    def clear(self) -> None:
        """Drop every cached basis."""
        self._bases.clear()

    def _probe(self, k: int, device: torch.device) -> torch.Tensor:
        key = (k, str(device))
        if key not in self._probes:
            gen = torch.Generator(device="cpu").manual_seed(20240531)
            self._probes[key] = torch.randn(k, generator=gen).to(device)
        return self._probes[key]

    @torch.no_grad()
    def key(self, weights: list[torch.Tensor], r: int) -> str:
        """The cache key of a block's writing weights at rank `r`."""
        digest = hashlib.sha1(f"v{_SOLVER_VERSION} r{r}".encode())
        for w in weights:
            digest.update(f"{tuple(w.shape)} {w.dtype}".encode())
            digest.update((w.to(torch.float32) @ self._probe(w.shape[1], w.device)).cpu().numpy().tobytes())
        return digest.hexdigest()

    def get(self, weight_lists: list[list[torch.Tensor]], r: int) -> list[torch.Tensor]:
        """The principal basis of each block's writing weights at rank `r`; the misses are computed together.

        Args:
            weight_lists (`list[list[torch.Tensor]]`): per block, its writing weights (each `(d, k_i)`).
            r (`int`): the rank.

        Returns:
            `list[torch.Tensor]`: per block, a `(d, r)` float32 basis on that block's device.
        """
        keys = [self.key(ws, r) for ws in weight_lists]
        missing = {key: ws for key, ws in zip(keys, weight_lists, strict=True) if key not in self._bases}
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for key, basis in zip(missing, principal_basis_batch(list(missing.values()), r), strict=True):
            self._bases[key] = basis.cpu()
        for key in keys:
            self._bases.move_to_end(key)
        bases = [self._bases[key].to(ws[0].device) for key, ws in zip(keys, weight_lists, strict=True)]
        while len(self._bases) > self.max_entries:
            self._bases.popitem(last=False)
        return bases


DEFAULT_CACHE = BasisCache()


def principal_bases(model: nn.Module, rank: int, *, cache: BasisCache | None = None) -> list[torch.Tensor]:
    """The principal basis of every decoder block of `model`, from the writing weights it holds now.

    Pass the result to `crma.attach(..., bases=...)` to attach several adapters without recomputing, or rely on the
    cache: `attach` looks every basis up in `cache` (the process-wide `DEFAULT_CACHE` when None), so attaching
    again to unchanged weights costs one fingerprint pass per block.

    Args:
        model (`nn.Module`): a causal LM with a `layers` ModuleList of decoder blocks (peft-wrapped, 4-bit allowed).
        rank (`int`): r.
        cache (`BasisCache | None`): where to look bases up and store them.

    Returns:
        `list[torch.Tensor]`: one `(d, rank)` float32 orthonormal basis per decoder block, on that block's device.
    """
    cache = DEFAULT_CACHE if cache is None else cache
    weight_lists = []
    for index, layer in enumerate(find_decoder_layers(model)):
        weights = writing_weights(layer, index)
        if any(w.is_meta for w in weights):
            raise ValueError(f"the writing weights of block {index} are on the meta device; load the weights first")
        weight_lists.append(weights)
    return cache.get(weight_lists, rank)
