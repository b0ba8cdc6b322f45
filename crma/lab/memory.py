"""The Space's memory preflight: one lockstep training step of the paired engine, estimated from a config alone (meta
device), checked against the device before anything loads.

Letters of the activation count: `b` batch, `t` tokens per row (`seq_len`), `h` hidden size, `i` MLP intermediate
size, `a` attention heads, `e` head dim, `v` vocabulary, `L` decoder layers, `w` bytes per element of the compute
dtype (4-bit models compute in it too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from crma.ablation.models import devices
from crma.ablation.models.configs import check_architecture, model_config
from crma.ablation.models.devices import resolve_device, resolve_dtype
from crma.ablation.models.errors import ModelLoadError
from crma.ablation.models.hub import Token
from crma.ablation.models.weights import weight_bytes
from crma.utils import is_lora_target

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 2**30
# Inputs that LoRA targets share: peft's A matrices of modules reading the same tensor keep one copy of it for
# backward in fp32 (each module its own copy in bf16/fp16, where peft casts the input to the fp32 adapter).
_INPUT_OF = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_mid",
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step of the paired engine on one device, by part, in bytes.

    The arms take their steps one after another, so the step terms count one arm's activations while the
    adapter term counts every arm's parameters and AdamW moments (and one arm's gradients). On the CPU the process
    holds more than its live tensors: glibc keeps freed activation memory in its heap while the step's tensors are
    smaller than its mmap threshold (32 MiB), and returns it beyond. `allocator_bytes` is that part, from the
    calibration in `benchmarks/bench_memory_estimate.py`.

    Args:
        device_type (`str`): `cpu` or `cuda`.
        batch_size (`int`): rows per step.
        seq_len (`int`): tokens per row (padded batches are counted at full length).
        weights_bytes (`int`): the frozen base weights.
        adapter_bytes (`int`): LoRA (and CRMA) parameters of every arm, their AdamW moments, one arm's gradients.
        runtime_bytes (`int`): a fixed margin besides tensors (CUDA context and workspaces on a GPU).
        activation_token_bytes (`float`): bytes autograd keeps for backward per token (b*t), all layers.
        activation_square_bytes (`float`): bytes kept per token per position of its row (the b*t*t terms: each
            layer's copy of the attention mask, or eager attention's probabilities).
        loss_token_bytes (`float`): bytes per token of the logits and cross-entropy buffers at the start of backward.
        allocator_factor (`float`): peak held / activation bytes while `tokens <= heap_tokens`.
        allocator_factor_large (`float`): the same for larger steps.
        heap_tokens (`int`): tokens per step up to which a hidden-state tensor (tokens x h) stays in the heap.
    """

    device_type: str
    batch_size: int
    seq_len: int
    weights_bytes: int
    adapter_bytes: int
    runtime_bytes: int
    activation_token_bytes: float
    activation_square_bytes: float
    loss_token_bytes: float
    allocator_factor: float = 1.0
    allocator_factor_large: float = 1.0
    heap_tokens: int = 0

    @property
    def tokens(self) -> int:
        """Tokens per step (batch_size * seq_len)."""
        return self.batch_size * self.seq_len

    @property
    def activation_bytes(self) -> int:
        """What one arm's step keeps for backward (live tensors)."""
        return int(self.tokens * (self.activation_token_bytes + self.seq_len * self.activation_square_bytes))

    @property
    def allocator_bytes(self) -> int:
        """What the allocator holds beyond the live activations at the peak."""
        factor = self.allocator_factor if self.tokens <= self.heap_tokens else self.allocator_factor_large
        return int((factor - 1.0) * self.activation_bytes)

    @property
    def loss_bytes(self) -> int:
        """The logits and loss buffers of one arm's step."""
        return int(self.tokens * self.loss_token_bytes)

    @property
    def fixed_bytes(self) -> int:
        """Everything that does not grow with the batch: weights, adapters, runtime."""
        return self.weights_bytes + self.adapter_bytes + self.runtime_bytes

    @property
    def total_bytes(self) -> int:
        """Estimated peak for the step."""
        return self.fixed_bytes + self.activation_bytes + self.allocator_bytes + self.loss_bytes

    def with_shape(self, *, batch_size: int, seq_len: int) -> MemoryEstimate:
        """The same model and adapters at another batch shape."""
        return replace(self, batch_size=batch_size, seq_len=seq_len)

    def max_batch_size(self, free_bytes: int, *, seq_len: int | None = None) -> int:
        """Largest batch such that it and every smaller batch fit in `free_bytes` at `seq_len` (this estimate's by
        default); 0 if none does."""
        t = self.seq_len if seq_len is None else seq_len
        fits = lambda b: self.with_shape(batch_size=b, seq_len=t).total_bytes <= free_bytes  # noqa: E731
        return _fitting_run(fits, edge=self.heap_tokens // t)

    def max_seq_len(self, free_bytes: int, *, batch_size: int | None = None) -> int:
        """Longest rows such that they and every shorter length fit in `free_bytes` at `batch_size` (this
        estimate's by default); 0 if none does."""
        b = self.batch_size if batch_size is None else batch_size
        fits = lambda t: self.with_shape(batch_size=b, seq_len=t).total_bytes <= free_bytes  # noqa: E731
        return _fitting_run(fits, edge=self.heap_tokens // b)


_SEARCH_LIMIT = 1 << 40


def _last_true(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """The last n in [lo, hi] with fits(n), for `fits` True-then-False there; lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _fitting_run(fits: Callable[[int], bool], *, edge: int) -> int:
    """The largest n with fits(1), ..., fits(n) all True. The estimate grows with n except for one drop where the
    allocator factor changes (after n = edge), so `fits` is True-then-False on [1, edge] and on [edge + 1, ...)."""
    if edge >= 1:
        last = _last_true(fits, 1, edge)
        if last < edge:
            return last
    lo = edge + 1 if edge >= 1 else 1
    hi = lo
    while hi < _SEARCH_LIMIT and fits(hi):  # double until a shape does not fit
        hi *= 2
    return _last_true(fits, lo, min(hi, _SEARCH_LIMIT))


def _layer_shape(config: PretrainedConfig) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    return {
        "h": h,
        "i": int(getattr(text, "intermediate_size", None) or 4 * h),
        "a": heads,
        "e": head_dim,
        "v": int(text.vocab_size),
        "L": int(text.num_hidden_layers),
    }


def _adapter_params(meta: nn.Module, lora_r: int, lora_targets: list[str]) -> int:
    total = 0
    for name, module in meta.named_modules():
        if isinstance(module, nn.Linear) and is_lora_target(name, lora_targets):
            total += lora_r * (module.in_features + module.out_features)
    return total


@dataclass(frozen=True)
class _Adapters:
    """The arms' adapters: `n_arms` LoRAs of rank `lora_r` on `targets`, CRMA on the first `crma_arms`."""

    n_arms: int
    crma_arms: int
    lora_r: int
    targets: list[str]
    dropout: bool
    crma_rank: int
    crma_streams: int

    def state_bytes(self, meta: nn.Module, s: dict[str, int]) -> int:
        """fp32 parameters and two AdamW moments per arm; gradients exist for the arm in its step only."""
        lora = _adapter_params(meta, self.lora_r, self.targets)
        n, c = self.crma_streams, self.crma_rank
        crma = s["L"] * (2 * s["h"] * c + n**2 + 2 * n + 1)
        per_arm = [lora + (crma if a < self.crma_arms else 0) for a in range(self.n_arms)]
        return 4 * (3 * sum(per_arm) + max(per_arm))

    def layer_bytes(self, s: dict[str, int], w: int) -> float:
        """Bytes per token per layer that the adapters keep: LoRA's A matrices' inputs and rank-r middles, CRMA's."""
        width = {"attn_in": s["h"], "attn_out": s["a"] * s["e"], "mlp_in": s["h"], "mlp_mid": s["i"]}
        groups = [_INPUT_OF.get(t, "attn_in") for t in self.targets]
        total = 4.0 * self.lora_r * len(self.targets)
        if self.dropout:
            # Every module drops out its own copy of the input and keeps the copy and the mask (input dtype on CPU).
            total += sum((4 + w) * width[g] for g in groups)
        elif w == 4:
            # o_proj reads a view of the attention output, which attention keeps already.
            total += sum(4 * width[g] for g in set(groups) - {"attn_out"})
        else:
            total += sum(4 * width[g] for g in groups)
        if self.crma_arms:
            # CRMA keeps the block's output before its read is added, and n*c-wide states (fp32).
            total += s["h"] * w + 4 * (3 * self.crma_streams * self.crma_rank + 4 * self.crma_rank + 2)
        return total


def _activation_bytes(
    meta: nn.Module, s: dict[str, int], w: int, adapters: _Adapters, attn_implementation: str, checkpointing: bool
) -> tuple[float, float]:
    """What the decoder keeps for backward, all layers: bytes per token, and per token per position of its row."""
    norms = 2 * (4 * s["h"] + 4)  # each RMSNorm keeps its input in fp32 and 1/rms
    if attn_implementation == "sdpa":
        attention = 4 * s["a"] * s["e"] * w + 4 * s["a"]  # q, expanded k and v, output; fp32 log-sum-exp
        square = w  # the layer's copy of the b x 1 x t x t mask
    else:
        attention = 3 * s["a"] * s["e"] * w
        square = s["a"] * w  # softmax probabilities, b x a x t x t
    gated = any(name.endswith("gate_proj") for name, _ in meta.named_modules())
    layer = norms + attention + (3 if gated else 2) * s["i"] * w + adapters.layer_bytes(s, w)
    if checkpointing:
        # Each layer keeps its input; backward recomputes one layer at a time, which then holds a full layer.
        return float(s["L"] * s["h"] * w + layer), float(square)
    return float(s["L"] * layer), float(s["L"] * square)


def _check_arguments(
    batch_size: int, seq_len: int, n_arms: int, crma_arms: int | None, attn_implementation: str, lora_targets: object
) -> None:
    for field_name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("n_arms", n_arms)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{field_name}` must be a positive integer; got {value!r}")
    if crma_arms is not None and not (isinstance(crma_arms, int) and 0 <= crma_arms <= n_arms):
        raise ValueError(f"`crma_arms` must be None or an integer in [0, n_arms]; got {crma_arms!r}")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"`attn_implementation` must be 'sdpa' or 'eager'; got {attn_implementation!r}")
    if not lora_targets:
        raise ValueError("`lora_targets` must name at least one module")


def estimate_training_memory(
    name_or_config: str | PretrainedConfig,
    *,
    batch_size: int,
    seq_len: int,
    n_arms: int = 2,
    crma_arms: int | None = None,
    lora_r: int = 8,
    lora_targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
    lora_dropout: float = 0.0,
    crma_rank: int = 4,
    crma_streams: int = 3,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    quantize_4bit: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str = "sdpa",
    token: Token = None,
    allow_local: bool = True,
) -> MemoryEstimate:
    """Estimate the peak memory of one lockstep training step, before any weight is loaded.

    Counts what a Llama-style decoder layer keeps for backward (measured with `saved_tensors_hooks` on
    transformers 5.24 / torch 2.13: the two RMSNorm inputs in fp32, q, k, v and the attention output with k/v
    expanded to every head, the attention log-sum-exp, one copy of the b x t x t mask per layer, the MLP's gate,
    activation and up outputs, LoRA's inputs and rank-r middles, CRMA's pre-mix block output), the fp32
    log-softmax of the logits and the cross-entropy gradients, the weights, and every arm's adapters with their
    AdamW moments. Padding is counted as tokens: a batch is padded to its longest row, which may be `seq_len`.

    Args:
        name_or_config (`str | PretrainedConfig`): a preset, a Hub id (its `config.json` is downloaded with `token`),
            a local folder (with `allow_local`), or a config.
        batch_size (`int`): rows per step.
        seq_len (`int`): tokens per row.
        n_arms (`int`): arms trained side by side (each has its own adapters and optimizer).
        crma_arms (`int | None`): how many of them carry CRMA; None counts all of them.
        lora_r (`int`): LoRA rank.
        lora_targets (`list[str]`): module names LoRA adapts.
        lora_dropout (`float`): LoRA dropout (> 0 keeps a copy and a mask per targeted module).
        crma_rank, crma_streams (`int`): CRMA side channel size.
        dtype (`str | torch.dtype`): weights and compute dtype (`auto` as `load_model` resolves it).
        device (`str | torch.device`): `auto`, `cpu` or `cuda`.
        quantize_4bit (`bool`): decoder Linear weights in nf4.
        gradient_checkpointing (`bool`): keep only each layer's input and recompute one layer at a time.
        attn_implementation (`str`): `sdpa` (transformers' default) or `eager` (keeps the b x a x t x t scores).
        token (`str | bool | None`): Hub token rule of `load_model`, for a Hub id's config.
        allow_local (`bool`): accept local folders as `name_or_config`.

    Returns:
        `MemoryEstimate`: the parts and the total.
    """
    _check_arguments(batch_size, seq_len, n_arms, crma_arms, attn_implementation, lora_targets)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    if isinstance(name_or_config, str):
        config, label = model_config(name_or_config, token=token, allow_local=allow_local), name_or_config
    else:
        config, label = name_or_config, type(name_or_config).__name__
    meta = check_architecture(label, config)
    s, w = _layer_shape(config), torch.empty((), dtype=dtype).element_size()
    crma_arms = n_arms if crma_arms is None else crma_arms
    adapters = _Adapters(n_arms, crma_arms, lora_r, list(lora_targets), lora_dropout > 0, crma_rank, crma_streams)
    per_token, per_square = _activation_bytes(meta, s, w, adapters, attn_implementation, gradient_checkpointing)
    allocator = _ALLOCATOR.get(device.type, _ALLOCATOR["cuda"])
    return MemoryEstimate(
        device_type=device.type,
        batch_size=batch_size,
        seq_len=seq_len,
        weights_bytes=weight_bytes(meta, dtype, quantize_4bit)[1],
        adapter_bytes=adapters.state_bytes(meta, s),
        runtime_bytes=allocator.runtime_bytes,
        activation_token_bytes=per_token,
        activation_square_bytes=per_square,
        # fp32 log-softmax kept for backward, then the loss gradient and log-softmax's gradient beside it.
        loss_token_bytes=float(3 * 4 * s["v"]),
        allocator_factor=allocator.factor,
        allocator_factor_large=allocator.factor_large,
        heap_tokens=_MMAP_THRESHOLD_MAX // (s["h"] * w) if allocator.heap else 0,
    )


@dataclass(frozen=True)
class _Allocator:
    runtime_bytes: int
    factor: float
    factor_large: float
    heap: bool


_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest dynamic mmap threshold on 64-bit: bigger blocks are mmapped
# CPU: measured with benchmarks/bench_memory_estimate.py on 15 settings (SmolLM2 with 2 arms at 256 to 4096 tokens
# per step; random-init models of SmolLM2's width with 4 and 30 layers at 2048 to 24576 tokens): the process holds
# 1.7-2.3x the live activations while the step's hidden-state tensors stay under glibc's mmap threshold, about
# 1.25x beyond. With these factors and 0.25 GiB, each measured peak RSS was 0.72-0.96 of the estimate.
# CUDA: not calibrated (no GPU here); the caching allocator's slack is taken as 20 % and the CUDA context with its
# cuBLAS workspaces as 1 GiB.
_ALLOCATOR = {
    "cpu": _Allocator(runtime_bytes=GIB // 4, factor=2.0, factor_large=1.25, heap=True),
    "cuda": _Allocator(runtime_bytes=GIB, factor=1.2, factor_large=1.2, heap=False),
}


def _fmt(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= 0.1 * GIB else f"{n_bytes / 2**20:.0f} MiB"


def check_training_fits(
    estimate: MemoryEstimate, device: str | torch.device, *, free_bytes: int | None = None
) -> None:
    """Raise `ModelLoadError` when the step of `estimate` does not fit the free memory of `device`.

    The message names the shape, the need, what is free, and the largest batch at this `seq_len` and the longest
    `seq_len` at this batch that do fit.

    Args:
        estimate (`MemoryEstimate`): from `estimate_training_memory`.
        device (`str | torch.device`): where the step runs.
        free_bytes (`int | None`): free memory to check against; None reads it from the device now.
    """
    resolved = device if isinstance(device, torch.device) else resolve_device(device)
    free = devices.free_memory_bytes(resolved) if free_bytes is None else free_bytes
    need = estimate.total_bytes
    if need <= free:
        return
    where = "on the GPU" if resolved.type == "cuda" else "on this CPU"
    b, t = estimate.batch_size, estimate.seq_len
    head = f"batch {b} × seq_len {t} needs ~{_fmt(need)} {where} ({_fmt(free)} free)"
    if estimate.with_shape(batch_size=1, seq_len=1).total_bytes > free:
        raise ModelLoadError(
            f"{head}; the model, adapters and runtime alone need ~{_fmt(estimate.fixed_bytes)}: pick a smaller model, "
            "fewer arms or 4-bit"
        )
    options = []
    max_b = estimate.max_batch_size(free)
    if max_b >= 1:
        options.append(f"at seq_len {t} at most batch {max_b} fits")
    max_t = estimate.max_seq_len(free)
    if max_t >= 1:
        options.append(f"at batch {b} at most seq_len {max_t}")
    hint = ", or ".join(options) if options else f"try batch 1 with seq_len {estimate.max_seq_len(free, batch_size=1)}"
    raise ModelLoadError(f"{head}; {hint}")
