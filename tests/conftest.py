"""Shared fixtures: everything offline, seeded, and in temp dirs."""

from __future__ import annotations

import os

# Offline before anything imports huggingface_hub / gradio: tests must never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_tiny_llama(layers: int = 2, hidden: int = 32, vocab: int = 259, model_type: str = "llama"):
    """A randomly initialised decoder-only LM built from a config (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture
def tiny_lm():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def records():
    """Synthetic records of four arms, one seed (see `synthetic.make_records`)."""
    from synthetic import make_records

    return make_records()


@pytest.fixture(scope="module")
def records2():
    """The same with two seeds."""
    from synthetic import make_records

    return make_records(seeds=(1, 2))
