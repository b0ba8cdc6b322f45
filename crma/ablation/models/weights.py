"""The size of a model's weights from its config alone (meta device), and whether they fit the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import devices
from .configs import check_architecture
from .errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 2**30
_NF4_BYTES = 0.515  # nf4 is 0.5 byte/param; double-quantised absmax and the quant state add ~3 %


def weight_bytes(meta: nn.Module, dtype: torch.dtype, quantize_4bit: bool) -> tuple[int, int]:
    """(parameters, bytes of the weights) of a meta-device model in `dtype`, decoder Linears in nf4 if asked."""
    from crma.utils import find_decoder_layers

    quantized: set[int] = set()
    if quantize_4bit:
        # bitsandbytes quantises the decoder's Linear weights; embeddings, lm_head, norms and biases stay in `dtype`.
        quantized = {id(m.weight) for m in find_decoder_layers(meta).modules() if isinstance(m, nn.Linear)}
    n_params, n_bytes = 0, 0.0
    elem = torch.empty((), dtype=dtype).element_size()
    for p in meta.parameters():  # `parameters()` yields tied weights once
        n_params += p.numel()
        n_bytes += p.numel() * (_NF4_BYTES if id(p) in quantized else elem)
    return n_params, int(n_bytes)


def estimate_model_size(
    config: PretrainedConfig, *, dtype: torch.dtype, quantize_4bit: bool = False
) -> tuple[int, int]:
    """Parameter count and weight bytes of the model `config` describes, without allocating it.

    Args:
        config (`PretrainedConfig`): a causal-LM config.
        dtype (`torch.dtype`): dtype the weights will be loaded in.
        quantize_4bit (`bool`): decoder Linear weights in nf4 (~0.5 byte/param).

    Returns:
        `tuple[int, int]`: (parameters, bytes of the weights).
    """
    return weight_bytes(check_architecture(type(config).__name__, config), dtype, quantize_4bit)


def _where(device: torch.device) -> str:
    return "the GPU" if device.type == "cuda" else "this machine (CPU RAM)"


def check_weights_fit(label: str, n_bytes: int, device: torch.device) -> None:
    """Raise `ModelLoadError` when the weights of `label` plus a small training headroom exceed `device`'s free
    memory (the step itself is checked with `check_training_fits` once its shape is known)."""
    headroom = int(0.2 * n_bytes + 0.5 * GIB)
    free = devices.free_memory_bytes(device)
    if n_bytes + headroom > free:
        raise ModelLoadError(
            f"model '{label}' needs ~{n_bytes / GIB:.1f} GiB for its weights plus ~{headroom / GIB:.1f} GiB "
            f"headroom for training, but {_where(device)} has {free / GIB:.1f} GiB free; pick a smaller model or "
            "enable 4-bit"
        )
