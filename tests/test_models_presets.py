"""Presets (the one table of Hub ids and architectures), the offline byte tokenizer, device and dtype choice."""

from __future__ import annotations

import pytest
import torch

from crma.ablation.models import (
    PRESETS,
    ModelLoadError,
    build_byte_tokenizer,
    describe_presets,
    estimate_model_size,
    preset_config,
    resolve_device,
    resolve_dtype,
    tiny_random_config,
)
from crma.ablation.models.errors import first_line, scrub_paths

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "Héllo wörld — naïve café",
    "你好，世界",
    "emoji 🚀🔥 and combining é",
    "a < s > b </ s>",
]


# --- presets -----------------------------------------------------------------------------------------------------


def test_presets_table():
    assert list(PRESETS) == ["tiny-random", "smollm2-135m", "tinyllama-1.1b", "qwen2.5-0.5b", "mistral-7b"]
    assert PRESETS["tiny-random"].hub_id is None
    assert PRESETS["smollm2-135m"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert PRESETS["tinyllama-1.1b"].hub_id == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert PRESETS["qwen2.5-0.5b"].hub_id == "Qwen/Qwen2.5-0.5B-Instruct"
    mistral = PRESETS["mistral-7b"]
    assert (mistral.hub_id, mistral.quantize_4bit, mistral.needs_gpu) == ("mistralai/Mistral-7B-v0.3", True, True)
    assert [p for p in PRESETS.values() if p.quantize_4bit or p.needs_gpu] == [mistral]
    described = describe_presets()
    assert [n for n, _ in described] == list(PRESETS)
    assert all(d and "\n" not in d for _, d in described)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_architecture_builds_the_model_it_names(name):
    # The shipped architecture is what size and memory estimates read offline: it must describe the real model,
    # whose parameter count (tied weights once) is known exactly.
    n_params, fp32_bytes = estimate_model_size(preset_config(name), dtype=torch.float32)
    assert n_params == PRESETS[name].approx_params
    assert fp32_bytes == 4 * n_params


def test_preset_config_rejects_unknown_names_and_tiny_random_is_its_preset():
    with pytest.raises(ValueError, match="`name` must be a preset"):
        preset_config("gpt-5")
    cfg = tiny_random_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.pad_token_id) == (64, 2, 259, 256)
    assert cfg.to_dict() == preset_config("tiny-random").to_dict()


# --- byte tokenizer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_is_lossless_and_ids_are_bytes(text):
    tok = build_byte_tokenizer()
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # no merges, no special tokens added
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials_and_padding():
    tok = build_byte_tokenizer()
    assert len(tok) == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.padding_side == "right"
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"] == [[97, 98, 256, 256], [97, 98, 99, 100]]
    assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert tok.decode([257, 104, 105, 258, 256], skip_special_tokens=True) == "hi"
    # Literal special-token text becomes the special id (the chat template relies on it) and still decodes back.
    ids = tok("<s>hi</s>")["input_ids"]
    assert ids == [257, 104, 105, 258] and tok.decode(ids) == "<s>hi</s>"


def test_byte_tokenizer_chat_template():
    tok = build_byte_tokenizer()
    messages = [{"role": "user", "content": "Café?"}, {"role": "assistant", "content": "Oui."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s>user\nCafé?</s>\n<s>assistant\nOui.</s>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<s>assistant\n")
    ids = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.decode(ids) == prompt


# --- device and dtype --------------------------------------------------------------------------------------------


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="`device` must be 'auto', 'cpu' or 'cuda'; got 'tpu'"):
        resolve_device("tpu")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float32", "cpu") is torch.float32
    with pytest.raises(ModelLoadError, match="`dtype` must be"):
        resolve_dtype("float8", cpu)


# --- one-line messages -------------------------------------------------------------------------------------------


def test_messages_keep_file_names_but_not_this_machines_paths():
    text = (
        "Can't load /root/.cache/huggingface/hub/models--a--b/snapshots/0123/config.json, see "
        "https://huggingface.co/a/b and ~/.cache/crma/smollm2-135m (C:\\Users\\x\\model.safetensors)"
    )
    assert scrub_paths(text) == (
        "Can't load config.json, see https://huggingface.co/a/b and smollm2-135m (model.safetensors)"
    )
    assert first_line(OSError("first /srv/app/assets/x.json\nsecond line")) == "first x.json"
    assert first_line(KeyError()) == "KeyError"
