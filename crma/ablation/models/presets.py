"""The named models the UI offers: their Hub ids (the project's one table of them) and their architectures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelPreset:
    """A named model the UI offers.

    Args:
        name (`str`): preset key in `PRESETS`.
        hub_id (`str | None`): Hugging Face Hub repository, `None` for a model built from a config.
        description (`str`): one line for the UI dropdown.
        quantize_4bit (`bool`): load in 4-bit nf4 (bitsandbytes) by default.
        needs_gpu (`bool`): refuse to load without CUDA.
        approx_params (`int`): parameter count (tied weights once), for display before anything is loaded.
        architecture (`dict[str, Any]`): `model_type` and the shape fields of the repository's `config.json`, so
            size and memory estimates need no download. Loading always reads the repository's own config.
    """

    name: str
    hub_id: str | None
    description: str
    quantize_4bit: bool
    needs_gpu: bool
    approx_params: int
    architecture: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _llama_shape(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **extra: Any):
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        **extra,
    }


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            "tiny-random",
            None,
            "Tiny random Llama (~0.1M params, byte tokenizer): instant, offline, for smoke tests",
            quantize_4bit=False,
            needs_gpu=False,
            approx_params=107_200,
            architecture={
                "model_type": "llama",
                **_llama_shape(259, 64, 128, 2, 4, 2),
                "max_position_embeddings": 2048,
                "tie_word_embeddings": False,
                "pad_token_id": 256,
                "bos_token_id": 257,
                "eos_token_id": 258,
            },
        ),
        ModelPreset(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct: real pretrained chat model, runs on CPU, works offline",
            quantize_4bit=False,
            needs_gpu=False,
            approx_params=134_515_008,
            architecture={
                "model_type": "llama",
                **_llama_shape(49152, 576, 1536, 30, 9, 3),
                "max_position_embeddings": 8192,
                "tie_word_embeddings": True,
            },
        ),
        ModelPreset(
            "tinyllama-1.1b",
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "TinyLlama-1.1B-Chat (Hub download, GPU recommended)",
            quantize_4bit=False,
            needs_gpu=False,
            approx_params=1_100_048_384,
            architecture={
                "model_type": "llama",
                **_llama_shape(32000, 2048, 5632, 22, 32, 4),
                "max_position_embeddings": 2048,
                "tie_word_embeddings": False,
            },
        ),
        ModelPreset(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "Qwen2.5-0.5B-Instruct (Hub download)",
            quantize_4bit=False,
            needs_gpu=False,
            approx_params=494_032_768,
            architecture={
                "model_type": "qwen2",
                **_llama_shape(151936, 896, 4864, 24, 14, 2),
                "max_position_embeddings": 32768,
                "tie_word_embeddings": True,
            },
        ),
        ModelPreset(
            "mistral-7b",
            "mistralai/Mistral-7B-v0.3",
            "Mistral-7B-v0.3 in 4-bit (QLoRA; needs a GPU and a Hub download)",
            quantize_4bit=True,
            needs_gpu=True,
            approx_params=7_248_023_552,
            architecture={
                "model_type": "mistral",
                **_llama_shape(32768, 4096, 14336, 32, 32, 8),
                "max_position_embeddings": 32768,
                "tie_word_embeddings": False,
            },
        ),
    )
}
OFFLINE_PRESETS = ("tiny-random", "smollm2-135m")


def describe_presets() -> list[tuple[str, str]]:
    """(name, one-line description) of every preset, in display order."""
    return [(p.name, p.description) for p in PRESETS.values()]


def preset_config(name: str) -> PretrainedConfig:
    """The transformers config of preset `name` built from its `architecture` (no download).

    Args:
        name (`str`): a key of `PRESETS`.

    Returns:
        `PretrainedConfig`: enough to build the model on the meta device and to estimate its memory; for a Hub preset
        the repository's own `config.json` adds fields (rope, token ids) that only loading needs.
    """
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ValueError(f"`name` must be a preset ({', '.join(PRESETS)}); got {name!r}")
    fields = dict(PRESETS[name].architecture)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def tiny_random_config() -> Any:
    """`LlamaConfig` of the `tiny-random` preset (hidden 64, 2 layers, 4 heads, 2 kv heads, byte vocabulary)."""
    return preset_config("tiny-random")
