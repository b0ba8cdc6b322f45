"""Helpers shared across the package (the one place they live)."""

from __future__ import annotations

import os

import torch
from torch import nn

SUPPORTED = "Llama, Mistral, Qwen2 and other decoders whose blocks sit in a `model.layers` ModuleList"


def is_lora_target(name: str, targets: list[str]) -> bool:
    """Whether module `name` is one peft's LoRA wraps for `target_modules=targets` (peft's rule: the name is a target
    or ends with "." + a target), so the engine, the estimator and peft agree on which modules train."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a (possibly peft-wrapped) HF causal LM, or a ValueError naming the need."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and name.rsplit(".", 1)[-1] == "layers"
            and len(module) > 0
            and all(hasattr(block, "self_attn") and hasattr(block, "mlp") for block in module)
        ):
            return module
    raise ValueError(
        f"CRMA supports {SUPPORTED} (each block with `self_attn` and `mlp`); "
        f"found no such `layers` ModuleList in {type(model).__name__}"
    )


def hidden_size_of(model: nn.Module) -> int:
    """The model (residual stream) width d, read from the HF config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot read `hidden_size` from the config of {type(model).__name__}")
    return size


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (each block may sit on its own device under a device_map)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else `os.cpu_count()`)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
