"""Models for the ablation engine: presets, loading (config-built, Hub, offline SmolLM2) and the weights' size.

One job per module: `presets` (the named models and their Hub ids), `devices` (device, dtype, free memory),
`tokenizer` (the offline byte tokenizer), `hub` (reachability and one-line Hub errors), `configs` (what a name
refers to, its config, whether CRMA can use it), `weights` (the weights' size and whether they fit), `offline` (the
SmolLM2 GGUF -> transformers cache) and `loading` (`load_model`, `check_model`).
"""

from __future__ import annotations

from .configs import model_config
from .devices import free_memory_bytes, resolve_device, resolve_dtype
from .errors import ModelLoadError
from .hub import hub_reachable
from .loading import LoadedModel, check_model, load_model
from .offline import cache_dir
from .presets import PRESETS, ModelPreset, describe_presets, preset_config, tiny_random_config
from .tokenizer import build_byte_tokenizer
from .weights import check_weights_fit, estimate_model_size

__all__ = [
    "PRESETS",
    "LoadedModel",
    "ModelLoadError",
    "ModelPreset",
    "build_byte_tokenizer",
    "cache_dir",
    "check_model",
    "check_weights_fit",
    "describe_presets",
    "estimate_model_size",
    "free_memory_bytes",
    "hub_reachable",
    "load_model",
    "model_config",
    "preset_config",
    "resolve_device",
    "resolve_dtype",
    "tiny_random_config",
]
